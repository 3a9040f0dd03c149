"""Tensor parallel (Megatron-LM): layers split over the model axis of the grid, joined by f and g.

    state.py      which ranks form the tensor group (initialize_model_parallel; the whole world by default)
    mappings.py   the conjugate operators f / g and the sequence-parallel gather / reduce-scatter
    layers.py     ColumnParallelLinear, RowParallelLinear, LayerNorm (sequence parallel)
    vocab.py      VocabParallelEmbedding, parallel logits, vocab_parallel_cross_entropy
    random.py     the RNG tracker: dropout equal across tensor ranks outside a region, different inside
    autotp.py     AutoTP: `"tensor_parallel": {"autotp_size": T}` shards a model's own Linear/Conv1D projections

Only ds_lab.comm and torch are imported: the layers work in any model, under any engine mode.
"""
from ds_lab.parallel.autotp import apply_autotp, tp_model_init
from ds_lab.parallel.layers import (ColumnParallelLinear, LayerNorm, RowParallelLinear, gather_parameter,
                                    make_tensor_parallel, mark_sequence_parallel, sequence_parallel_grad,
                                    shard_tensor)
from ds_lab.parallel.mappings import (copy_to_region, gather_from_region, gather_from_sequence_region,
                                      reduce_from_region, reduce_scatter_to_sequence_region, scatter_to_region,
                                      scatter_to_sequence_region)
from ds_lab.parallel.random import (RNGStatesTracker, get_cuda_rng_tracker, get_rng_tracker,
                                    model_parallel_cuda_manual_seed, model_parallel_manual_seed,
                                    tensor_parallel_dropout)
from ds_lab.parallel.state import (data_parallel_rank, data_parallel_world_size, destroy_model_parallel,
                                   initialize_model_parallel, model_parallel_group, model_parallel_is_initialized,
                                   model_parallel_rank, model_parallel_world_size)
from ds_lab.parallel.vocab import (VocabParallelEmbedding, padded_vocab_size, parallel_lm_logits,
                                   vocab_parallel_cross_entropy)

__all__ = ["ColumnParallelLinear", "LayerNorm", "RNGStatesTracker", "RowParallelLinear", "VocabParallelEmbedding",
           "copy_to_region", "data_parallel_rank", "data_parallel_world_size", "destroy_model_parallel",
           "gather_from_region", "gather_from_sequence_region", "gather_parameter", "get_cuda_rng_tracker",
           "get_rng_tracker", "initialize_model_parallel", "make_tensor_parallel", "mark_sequence_parallel",
           "model_parallel_cuda_manual_seed", "model_parallel_group", "model_parallel_is_initialized",
           "model_parallel_manual_seed", "model_parallel_rank", "model_parallel_world_size", "padded_vocab_size",
           "parallel_lm_logits", "reduce_from_region", "reduce_scatter_to_sequence_region", "scatter_to_region",
           "scatter_to_sequence_region", "sequence_parallel_grad", "shard_tensor", "tensor_parallel_dropout",
           "vocab_parallel_cross_entropy"]
__all__ += ["apply_autotp", "tp_model_init"]
