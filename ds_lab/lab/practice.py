"""Rank functions for chapter 7 (practice): the article's §5.2 GPT-2 program, and the program corrected.

    attempts = ds_lab.launch(run_article_versions, 1, article_versions(), save_dir)   # what fails, and why
    result = ds_lab.launch(train_gpt2, 2, ds_config(stage=3), steps=8, save_dir=d)    # the corrected program

The model is a Hugging Face `GPT2LMHeadModel` built from a `GPT2Config` (no download), tiny, with the
byte tokenizer's vocabulary of 256, trained on the shipped corpus. Dropout is off, so that a run is a
function of its weights, optimizer state and data position alone: exactly what a checkpoint holds.
"""
from __future__ import annotations

import statistics
import traceback

import torch

import ds_lab
from ds_lab import comm
from ds_lab.data import DistributedLoader, corpus_tokens

SEQ_LEN = 64
GPT2_SHAPE = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=SEQ_LEN)

# The article's §5.2 program, line for line; only its comments are translated from Chinese. The one
# change made to run it at all is the import (`import ds_lab as deepspeed`), done by article_versions().
ARTICLE_GPT2 = """\
import deepspeed
import torch
from transformers import GPT2LMHeadModel, GPT2Tokenizer

# define the model and the tokenizer
model_name = 'gpt2'
tokenizer = GPT2Tokenizer.from_pretrained(model_name)
model = GPT2LMHeadModel.from_pretrained(model_name)

# define the training parameters
batch_size = 16
learning_rate = 1e-4
epochs = 10

# initialize the DeepSpeed engine
engine, optimizer, _, _ = deepspeed.initialize(
    args=args,
    model=model,
    optimizer=torch.optim.AdamW(model.parameters(), lr=learning_rate),
)

# training loop
for epoch in range(epochs):
    for batch in train_dataloader:
        # move the data to the GPU
        input_ids = batch['input_ids'].cuda()
        attention_mask = batch['attention_mask'].cuda()

        # forward pass
        outputs = engine(input_ids=input_ids, attention_mask=attention_mask)

        # compute the loss
        loss = outputs.loss

        # backward pass and optimization
        engine.backward(loss)
        engine.step()

# save the model
engine.save_checkpoint(args.output_dir)
"""

# Each fix: (what was wrong, the text replaced, its replacement). Applied in order, each one gets the
# program one error further; after the last it runs to the end.
ARTICLE_FIXES = (
    ("from_pretrained('gpt2') downloads the tokenizer and 500 MB of weights",
     "tokenizer = GPT2Tokenizer.from_pretrained(model_name)\n"
     "model = GPT2LMHeadModel.from_pretrained(model_name)\n",
     "from transformers import GPT2Config\n"
     "from ds_lab.lab.practice import gpt2_config\n"
     "from ds_lab.data import ByteTokenizer\n"
     "tokenizer = ByteTokenizer()\n"
     "model = GPT2LMHeadModel(gpt2_config())  # built from a config: random weights, no download\n"),
    ("`args` is never defined (DeepSpeed reads the config from args.deepspeed_config)",
     "# initialize the DeepSpeed engine\n",
     "# initialize the DeepSpeed engine\n"
     "import argparse\n"
     "args = argparse.Namespace(deepspeed_config={'train_batch_size': batch_size}, output_dir=OUTPUT_DIR)\n"),
    ("`train_dataloader` is never defined",
     "# training loop\n",
     "# training loop\n"
     "from ds_lab.data import DistributedLoader, corpus_tokens\n"
     "epochs = 2  # a demonstration, not a training run\n"
     "loader = DistributedLoader(corpus_tokens(), 32, batch_size)\n"
     "train_dataloader = [dict(b, attention_mask=torch.ones_like(b['input_ids'])) for b in (loader.batch(0), loader.batch(1))]\n"),
    ("`.cuda()` needs a GPU; the engine knows the device of its rank",
     "batch['input_ids'].cuda()\n        attention_mask = batch['attention_mask'].cuda()\n",
     "batch['input_ids'].to(engine.device)\n        attention_mask = batch['attention_mask'].to(engine.device)\n"),
    ("without labels= a Hugging Face model returns no loss (outputs.loss is None)",
     "outputs = engine(input_ids=input_ids, attention_mask=attention_mask)\n",
     "outputs = engine(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)\n"),
)


def gpt2_config(**overrides):
    """The chapter's GPT-2: 2 layers, width 64, 4 heads, the byte vocabulary (256), no dropout.

    Dropout off makes training deterministic without saving RNG state; a byte vocabulary has no
    special tokens, so the bos/eos ids (50256 in GPT-2) are unset."""
    from transformers import GPT2Config
    return GPT2Config(**{**GPT2_SHAPE, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                         "bos_token_id": None, "eos_token_id": None, **overrides})


def article_versions() -> list:
    """[(name, code)]: the article's program with only the import changed, then with each fix added."""
    code = ARTICLE_GPT2.replace("import deepspeed\n", "import ds_lab as deepspeed\n", 1)
    versions = [("as printed (import changed)", code)]
    for reason, old, new in ARTICLE_FIXES:
        if old not in code:
            raise ValueError(f"fix {reason!r}: its text is not in the program")
        code = code.replace(old, new, 1)
        versions.append((f"fixed: {reason}", code))
    return versions


def run_article_versions(versions, output_dir) -> list:
    """Runs each version of the program in turn on this rank; for each, the error it stops at (or None)."""
    out = []
    for name, code in versions:
        namespace = {"OUTPUT_DIR": output_dir, "__name__": "article"}
        try:
            exec(compile(code, f"<article: {name}>", "exec"), namespace)
        except Exception as error:  # noqa: BLE001 - showing every failure is the point
            out.append(dict(name=name, error=type(error).__name__, message=str(error).strip(),
                            traceback=traceback.format_exc(limit=-1)))
        else:
            engine = namespace["engine"]
            out.append(dict(name=name, error=None, message="ran to the end", traceback="",
                            steps=engine.global_steps, loss=namespace["loss"].item()))
    return out


def ds_config(stage=3, lr=2e-3, warmup=4):
    """The DeepSpeed config of the corrected program (the chapter explains it key by key)."""
    return {
        "train_batch_size": 16,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr,
                                                     "warmup_num_steps": warmup}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 20_000,
                              "overlap_comm": True, "stage3_param_persistence_threshold": 0},
        "steps_per_print": None,
    }


def probe_batch(rows=4):
    """A fixed batch no training step draws from (the last SEQ_LEN x rows tokens of the corpus)."""
    tokens = corpus_tokens()[-rows * SEQ_LEN:]
    return tokens.view(rows, SEQ_LEN).clone()


def train_gpt2(config, steps, save_dir=None, save_every=None, resume=False, crash_at=None, probe=None):
    """The corrected program, on every rank: a config-built GPT-2 trained `steps` optimizer steps.

    save_every: save a checkpoint to `save_dir` after every that many steps (with the losses so far and
        the loader's position as client_state, so a resumed run knows where it was).
    resume: load the latest checkpoint of `save_dir` first and continue from it.
    crash_at: rank 1 raises when it reaches this step, after the last save: a job killed mid-run.
    probe: a batch of input ids; rank 0 returns the trained model's logits and loss on it.
    Returns the per-step losses (mean over the global batch: every rank's micro-batches), the gradient
    reduce-scatters of the last step, and, with probe, the logits."""
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)  # the same initial weights on every rank (the engine also broadcasts rank 0's)
    model = GPT2LMHeadModel(gpt2_config())
    engine, _, _, _ = ds_lab.initialize(model=model, config=config)
    loader = DistributedLoader(corpus_tokens(), SEQ_LEN, engine.train_micro_batch_size_per_gpu(),
                               dp_rank=engine.dp_rank, dp_size=engine.dp_world_size)
    losses, loaded_from = [], None
    if resume:
        loaded_from, client_state = engine.load_checkpoint(save_dir)
        if loaded_from is None:
            raise FileNotFoundError(f"resume=True but {save_dir} holds no checkpoint")
        losses = list(client_state["losses"])
        loader.load_state_dict(client_state["loader"])
    start = engine.global_steps
    while engine.global_steps < steps:
        if crash_at is not None and engine.global_steps == crash_at and comm.get_rank() == 1:
            raise RuntimeError(f"rank 1 killed at step {crash_at} (simulated: a node lost mid-run)")
        micro_losses, mark = [], comm.record_count()
        for _ in range(engine.gradient_accumulation_steps()):
            loss = engine(**next(loader)).loss
            engine.backward(loss)
            engine.step()
            micro_losses.append(loss.item())
        # the step's loss over the whole global batch: client_state is written by rank 0 only, so
        # what it saves must be what every rank holds
        step_loss = torch.tensor(statistics.fmean(micro_losses), dtype=torch.float64)
        comm.all_reduce(step_loss)
        losses.append(step_loss.item() / comm.get_world_size())
        reduce_scatters = sum(r.tag == "grad_reduce_scatter" for r in comm.get_log(since=mark))
        if save_every and engine.global_steps % save_every == 0:
            engine.save_checkpoint(save_dir, client_state={"losses": losses, "loader": loader.state_dict()})
    out = dict(losses=losses, start=start, steps=engine.global_steps, loaded_from=loaded_from,
               lr=engine.get_lr()[0], reduce_scatters_last_step=reduce_scatters if steps > start else 0)
    if probe is not None:
        engine.eval()
        with torch.no_grad():  # under ZeRO-3 every rank takes part: the forward gathers each unit
            result = engine(input_ids=probe.to(engine.device), labels=probe.to(engine.device))
        if comm.get_rank() == 0:
            out.update(logits=result.logits.float().cpu(), probe_loss=result.loss.item())
    return out
