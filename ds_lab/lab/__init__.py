"""What the chapters share: rank functions, independent measurements, tables.

    workers.py   functions run on every rank by `ds_lab.launch` (data parallel, ZeRO)
    zero_by_hand.py  ZeRO-1 written out (reduce-scatter, Adam on the chunk, all-gather) (chapter 3)
    measure.py   measurements that do not ask the engine (a census of live tensors, hooks of our own)
    tables.py    the model-states tables the chapters print
    background.py  model growth, GPU capacities, counted FLOPs and a step's allocations (chapter 1)
    alpha_beta.py, naive_dp.py  the α–β cost model measured; naive data parallel, instrumented (chapter 2)
    model_parallel.py  rank functions for tensor and pipeline parallelism (chapter 4)
    drawings.py  pipeline Gantt charts and the (pipe, data, model) grid, drawn without a run
    compression.py  1-bit Adam, SignAdam, signSGD runs and the compressed all-reduce by hand (chapter 5)
    overlap.py   overlap_comm on vs off, step timelines and what overlapped (chapter 5)
    hierarchy.py the flat ring and the hierarchical all-reduce on simulated nodes (chapter 5)
    kernels.py   the roofline from the kernels' headers, unfused byte counts (chapter 6)
    practice.py  the article's §5.2 program and its fixes, a GPT-2 trained and resumed (chapter 7)
    applications.py  language models on prose and code, per-token losses (chapter 8)
    compat.py    DeepSpeed's config keys against ds_lab's schema (chapter 9)
    scale.py     the scale simulator: memory and step time of 3D layouts on real clusters (chapter 10)
    advisor.py, failures.py  the config advisor, and failures caused on purpose (chapter 11)

A chapter imports these and never pastes them; a function here is importable, so a spawned rank
(NCCL on GPUs) finds it too.
"""
from ds_lab.lab.measure import (ConstructionProbe, WholeParameterProbe, bucket_sizes, census_since,
                                own_parameter_counts, padded, padded_sizes, tensor_census)
from ds_lab.lab.tables import STATES, model_states, states_table, states_vs_formula_table
from ds_lab.lab.workers import data_parallel_train, global_losses, rows_of, zero_train
from ds_lab.lab.model_parallel import (gpt_pipeline_layers, next_token_pairs, pipeline_reference, pipeline_train,
                                       sgd, split_matmul, tensor_parallel_mlp, tensor_parallel_traffic,
                                       tensor_parallel_train)
from ds_lab.lab.drawings import compute_spans, draw_gantt, draw_topology, gantt_legend, planned_spans

__all__ = ["ConstructionProbe", "WholeParameterProbe", "bucket_sizes", "census_since", "own_parameter_counts",
           "padded", "padded_sizes", "tensor_census", "STATES", "model_states", "states_table",
           "states_vs_formula_table", "data_parallel_train", "global_losses", "rows_of", "zero_train",
           "gpt_pipeline_layers", "next_token_pairs", "pipeline_reference", "pipeline_train", "sgd", "split_matmul",
           "tensor_parallel_mlp", "tensor_parallel_traffic", "tensor_parallel_train", "compute_spans", "draw_gantt",
           "draw_topology", "gantt_legend", "planned_spans"]
