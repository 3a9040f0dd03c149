# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 8 · Applications: text, code, and what science would take
#
# *Source article §6. Skeleton: Goal · The idea · Run it · Measure · Compare with theory ·
# Exercises · Summary.*
#
# ## Goal
#
# The article's §6 lists what large language models are used for: text generation (§6.1), code
# completion (§6.2) and science: protein structures, drug discovery, materials (§6.3). Here we do
# the first two for real, at the scale two CPU cores allow. We train a small GPT on the shipped
# prose corpus on 2 ranks, write the sampler that turns it into a text generator, and measure what
# it learned per token. Then we train the same GPT on code (ds_lab's own sources) and let it
# complete function headers. For §6.3 we do not pretend: we compute, with chapter 3's estimator,
# what memory a science-sized model would need.

# %% [markdown]
# ## The idea
#
# A language model gives, for every prefix, a distribution over the next token. **Generation** is
# a loop: score the text so far, draw one token, append it, repeat. How to draw is the only design
# choice, and `ds_lab/generate.py` implements the usual ones. With logits $z$:
#
# | setting | next token drawn from | effect |
# |---|---|---|
# | `temperature=0` | all mass on $\arg\max z$ (greedy) | deterministic; tends to loop |
# | `temperature=T` | $\text{softmax}(z/T)$ | $T<1$ sharpens, $T>1$ flattens |
# | `top_k=k` | the $k$ most probable tokens, renormalised | cuts the long tail |
# | `top_p=p` | the smallest set of most probable tokens whose probability reaches $p$ (the "nucleus", Holtzman et al. 2020), renormalised | the cut adapts to how sure the model is |
#
# `tests/test_generate.py` holds the sampler to this table: greedy is the argmax, `top_k=1` is
# greedy, `top_p` drops exactly the tail beyond $p$, and 20,000 draws pass a chi-square test
# against the distribution as written.
#
# **Per-token loss** is the score: $-\ln p(x_t \mid x_{<t})$ in nats. An untrained model spreads
# its mass over all 256 byte values, so its loss is about $\ln 256 = 5.55$ nats (8 bits per byte).
# Whatever the model learns shows up as a lower loss on text it has *not* trained on.
#
# **Code completion** is the same loop on a different corpus. A model trained on prose has never
# seen `def` or four-space indents. Its loss on code tells how much of "language" carries over.

# %%
# %matplotlib inline
import math
import time

import matplotlib.pyplot as plt
import torch

import ds_lab
from ds_lab.data import ByteTokenizer, corpus_tokens, train_val_split
from ds_lab.generate import generate, next_token_probs
from ds_lab.lab.applications import (bits_per_byte, code_corpus_text, code_corpus_tokens, corpus_files,
                                     draw_token_losses, draw_training, mean_loss, model_from, per_token_loss,
                                     train_language_model, untrained_model)
from ds_lab.monitor import Dashboard
from ds_lab.zero.estimate import estimate_model_states, format_count, formula, what_fits

MODEL = dict(n_layer=2, n_head=4, n_embd=128, block_size=64)
N = 2                                 # ranks (2 CPU cores)
PROSE_STEPS, CODE_STEPS, BATCH = 300, 200, 32   # optimizer steps; sequences per step (16 per rank)
EVAL_TOKENS = 20_000                  # held-out tokens each loss below is measured on

prose_train, prose_val = train_val_split(corpus_tokens())       # held out: the end of 2 Samuel
code_train, code_val = train_val_split(code_corpus_tokens())    # held out: the last 10% of the code
PSI = untrained_model(MODEL).num_parameters()
print(f"GPT {MODEL}: Ψ = {PSI:,} parameters")
print(f"prose: {len(prose_train):,} training bytes, {len(prose_val):,} held out")
print(f"code:  {len(code_train):,} training bytes, {len(code_val):,} held out "
      f"({len(corpus_files(code_corpus_text()))} files of ds_lab's own sources)")

# %% [markdown]
# ## Run it
#
# ### 1. Train a GPT on prose, on 2 ranks
#
# `train_language_model` (in `ds_lab/lab/applications.py`) runs on each rank. It builds the GPT
# with the same seed everywhere, wraps it in the engine (data parallel, AdamW, warmup then cosine
# decay, gradient clipping 1.0), and draws its rows of each global batch from a
# `DistributedLoader`. It returns its losses and final weights. The dashboard follows the run live.

# %%
start = time.time()
prose_run = ds_lab.launch(train_language_model, N, prose_train, MODEL, steps=PROSE_STEPS, global_batch=BATCH,
                          dashboard=Dashboard(f"GPT on the KJV narrative books, {N} ranks"))
prose_seconds = time.time() - start
prose_model, untrained = model_from(prose_run[0]), untrained_model(MODEL)
print(f"{PROSE_STEPS} steps in {prose_seconds:.0f} s; loss {prose_run[0]['losses'][0]:.2f} -> "
      f"{sum(prose_run[0]['losses'][-20:]) / 20:.2f} (mean of the last 20 steps, rank 0's rows)")

# %% [markdown]
# ### 2. Generate: temperature, top-k, top-p
#
# The same prompt and the same seed each time; only the sampling rule changes.

# %%
PROMPT = "And the LORD said unto"
SETTINGS = {"greedy (T = 0)": dict(temperature=0), "T = 0.7": dict(temperature=0.7),
            "T = 1.0": dict(temperature=1.0), "T = 1.3": dict(temperature=1.3),
            "T = 1.0, top_k = 5": dict(temperature=1.0, top_k=5),
            "T = 1.0, top_p = 0.8": dict(temperature=1.0, top_p=0.8)}
samples = {name: generate(prose_model, PROMPT, 160, seed=0, **kw) for name, kw in SETTINGS.items()}
for name, text in samples.items():
    print(f"--- {name}\n{text}\n")

# %% [markdown]
# What to look for:
#
# - **Greedy** is the single most likely path. A small model soon falls into a loop of its
#   favourite words.
# - **T = 0.7** stays close to the corpus's frequent words. **T = 1.0** samples the model as
#   trained. **T = 1.3** gives the tail more weight: more made-up words, odd capitals, and it can
#   draw bytes that are not valid text (shown as �).
# - **top-k** and **top-p** cut the tail at T = 1.0: they keep variety but drop the rarest bytes.
#   Top-p keeps few tokens where the model is sure (inside a word) and many where it
#   is not (after a space).
#
# That last point can be measured: how many tokens the nucleus keeps at each step of a greedy
# continuation.

# %%
ids = ByteTokenizer().encode(samples["greedy (T = 0)"])
with torch.no_grad():
    logits = prose_model(torch.tensor([ids[-MODEL["block_size"]:]])).logits[0]
nucleus = (next_token_probs(logits, temperature=1.0, top_p=0.8) > 0).sum(-1)
after_space = [int(n) for n, i in zip(nucleus, ids[-MODEL["block_size"]:]) if i == ord(" ")]
inside_word = [int(n) for n, i in zip(nucleus, ids[-MODEL["block_size"]:]) if chr(i).isalpha()]
print(f"tokens kept by top_p = 0.8: after a space {sum(after_space) / len(after_space):.1f} on average, "
      f"after a letter {sum(inside_word) / len(inside_word):.1f}")

# %% [markdown]
# ## Measure
#
# ### 3. Loss per token on held-out prose, trained vs untrained

# %%
val_prose = prose_val[:EVAL_TOKENS]
loss = {"untrained": mean_loss(untrained, val_prose, MODEL["block_size"]),
        "trained on prose": mean_loss(prose_model, val_prose, MODEL["block_size"])}
for name, value in loss.items():
    print(f"{name:<17} held-out prose: {value:.3f} nats per byte = {bits_per_byte(value):.2f} bits per byte")
print(f"uniform over 256 bytes: ln 256 = {math.log(256):.3f} nats = 8 bits")

PASSAGE = ByteTokenizer().decode(prose_val[1000:1080])
passage_ids = torch.tensor(ByteTokenizer().encode(PASSAGE))
fig = draw_token_losses(PASSAGE, {"untrained": per_token_loss(untrained, passage_ids, MODEL["block_size"]),
                                  "trained": per_token_loss(prose_model, passage_ids, MODEL["block_size"])},
                        "loss of each byte of a held-out passage (x: the byte being predicted)")
plt.show()

# %% [markdown]
# The untrained model pays about 5.5 nats for every byte. The trained one pays little for the
# letters that finish a word it has recognised, and most at the first letter after a space, where
# the next word is open.
#
# ### 4. Code: train the same GPT on ds_lab's sources, complete function headers

# %%
start = time.time()
code_run = ds_lab.launch(train_language_model, N, code_train, MODEL, steps=CODE_STEPS, global_batch=BATCH,
                         dashboard=Dashboard(f"GPT on ds_lab's Python sources, {N} ranks"))
code_seconds = time.time() - start
code_model = model_from(code_run[0])
fig = draw_training({"prose": prose_run[0]["losses"], "code": code_run[0]["losses"]},
                    f"training loss, rank 0's rows ({N} ranks, global batch {BATCH})")
plt.show()
print(f"{CODE_STEPS} steps in {code_seconds:.0f} s")

# %% [markdown]
# The first two headers below come from the held-out part of the corpus (`ds_lab/zero/stage3_units.py`),
# so the model has not seen their bodies. The third is not in ds_lab at all.

# %%
HEADERS = ['def coalesce(units: list, bucket_size: int) -> list:\n    """',
           "    def zero_grad(self) -> None:\n",
           "def all_reduce_mean(tensor, world_size):\n"]
completions = {header: generate(code_model, header, 200, temperature=1.0, seed=0) for header in HEADERS}
for text in completions.values():
    print(text, "\n" + "-" * 60)

# %% [markdown]
# Be honest about what this is. A 2-layer model trained for 200 steps (half a minute) on 300 KB of
# code has learned the *statistics* of Python bytes, not Python: spaces come in long runs (indentation
# is the most frequent thing in code), quotes and brackets come in clusters, fragments of identifiers
# and English words appear. At lower temperatures the completions collapse into runs of spaces, the
# single most likely byte. Nothing here is working code. Code models that are useful, from Codex
# onwards, have billions of parameters and train on hundreds of gigabytes of code. What the small
# run does show, measurably, is that the model has learned something specific to code: next.
#
# ### 5. Which model knows code? Loss on held-out code and on held-out prose

# %%
val_code = code_val[:EVAL_TOKENS]
cross = {(model_name, text_name): mean_loss(model, tokens, MODEL["block_size"])
         for model_name, model in (("untrained", untrained), ("prose model", prose_model), ("code model", code_model))
         for text_name, tokens in (("prose", val_prose), ("code", val_code))}
print(f"{'held-out loss (nats per byte)':<30}{'prose':>8}{'code':>8}")
for model_name in ("untrained", "prose model", "code model"):
    print(f"{model_name:<30}{cross[model_name, 'prose']:>8.3f}{cross[model_name, 'code']:>8.3f}")

# %% [markdown]
# Each model is best on its own kind of text. The prose model still does better on code than the
# untrained one: spaces, newlines and English words in comments and docstrings carry over. The
# same holds the other way.
#
# ## Compare with theory
#
# ### 6. §6.3, science: what it would take
#
# The article names protein structure prediction, drug discovery and materials science. None of
# that can be trained here, and we will not fake it. What we can compute is the memory side.
# Language models of proteins read sequences over an alphabet of 20 amino acids, the same
# next-token (or masked-token) task as above. The byte tokenizer and this GPT would take such
# sequences unchanged. What changes is the scale. The largest ESM-2 protein language model
# (Lin et al., *Science* 2023) has 15 billion parameters. AlphaFold 2, the structure predictor, is
# not a language model at all and is far smaller: about 93 million parameters, but a costly,
# specialised architecture.
#
# Chapter 3's estimator gives the model states per GPU of a 15B model trained with Adam in mixed
# precision (16 bytes per parameter), at each ZeRO stage:

# %%
SCIENCE_PSI, GPU_BYTES = 15e9, 80e9
for world in (8, 64):
    print(f"Ψ = {format_count(SCIENCE_PSI)}, N = {world} GPUs: model states per GPU")
    for stage in (0, 1, 2, 3):
        total = estimate_model_states(SCIENCE_PSI, world, stage)["total"]
        fits = "fits" if total <= GPU_BYTES else "does not fit"
        print(f"  stage {stage}: {total / 1e9:7.1f} GB   {formula(stage):<22} {fits} in {GPU_BYTES / 1e9:.0f} GB")
fits_8 = what_fits(GPU_BYTES, 8)
print("largest Ψ whose model states fit in 80 GB on 8 GPUs:",
      {f"stage {s}": format_count(p) for s, p in fits_8.items()})
print(f"this chapter's GPT: Ψ = {PSI:,}, model states {16 * PSI / 1e6:.1f} MB; "
      f"15B is {SCIENCE_PSI / PSI:,.0f} times larger")

# %% [markdown]
# So, on one node of eight 80 GB GPUs, a 15B model does not fit with plain data parallelism
# (240 GB per GPU) or with ZeRO-1. It fits with ZeRO-2 or ZeRO-3, before activations, which
# chapter 3's `estimate_activations` adds. Memory is the part ZeRO solves. What this course cannot
# supply is the rest of a science project: curated data (protein sequence databases, assay
# results, crystal structures), compute for weeks, and, above all, evaluation against experiment.
# A model's loss on held-out sequences says nothing yet about whether a predicted drug binds.
#
# ### Assertions: every claim above, measured

# %%
# 1. Training helped: the trained model beats the untrained one on held-out prose by a wide margin,
#    and the untrained one is near uniform (ln 256)
assert abs(loss["untrained"] - math.log(256)) < 0.1
assert loss["trained on prose"] < loss["untrained"] - 2.5
assert prose_run[0]["losses"][-1] < prose_run[0]["losses"][0] - 2.5
print(f"prose: {loss['untrained']:.2f} -> {loss['trained on prose']:.2f} nats per byte on held-out text")

# %%
# 2. Generation: a fixed seed reproduces the text; greedy and top_k = 1 agree; every setting
#    continues the prompt
assert generate(prose_model, PROMPT, 160, seed=0, **SETTINGS["T = 1.0"]) == samples["T = 1.0"]
assert generate(prose_model, PROMPT, 160, seed=1, top_k=1) == samples["greedy (T = 0)"]
assert all(text.startswith(PROMPT) for text in samples.values())
assert len(set(samples.values())) == len(samples)  # each rule gave a different text
# top_p adapts: the nucleus is wider after a space than inside a word
assert sum(after_space) / len(after_space) > sum(inside_word) / len(inside_word)
print("generation: seeded sampling reproducible; top_k = 1 is greedy; the nucleus widens after a space")

# %%
# 3. Code: each model is best on its own kind of text, and both beat the untrained model everywhere
assert cross["code model", "code"] < cross["prose model", "code"] < cross["untrained", "code"]
assert cross["prose model", "prose"] < cross["code model", "prose"] < cross["untrained", "prose"]
assert all(text.startswith(header) for header, text in completions.items())
print(f"code: loss on held-out code {cross['code model', 'code']:.2f} (code model) vs "
      f"{cross['prose model', 'code']:.2f} (prose model)")

# %%
# 4. Science: the estimator's numbers used in the text (GB = 1e9 bytes)
gb = {(world, stage): estimate_model_states(SCIENCE_PSI, world, stage)["total"] / 1e9
      for world in (8, 64) for stage in (0, 1, 2, 3)}
assert gb[8, 0] == 240 and gb[8, 1] == 82.5 and gb[8, 2] == 56.25 and gb[8, 3] == 30
assert [gb[8, s] <= 80 for s in (0, 1, 2, 3)] == [False, False, True, True]
assert math.isclose(gb[64, 3], 16 * SCIENCE_PSI / 64 / 1e9)
assert fits_8[2] >= SCIENCE_PSI > fits_8[1]
print("science: 15B on 8 x 80 GB needs ZeRO-2 or ZeRO-3 for its model states")

# %% [markdown]
# ## Exercises
#
# 1. **Temperature and loss.** Compute the held-out loss of the prose model with its logits divided
#    by T = 0.7 and by T = 1.3. Why is T = 1 the best for the loss, though T = 0.7 reads better?
# 2. **Repetition.** Count how often greedy decoding repeats a 10-byte string within its 160
#    bytes, for the trained model, at T = 0 and with top_p = 0.9.
# 3. **Longer training.** Double `PROSE_STEPS`. Predict from the training curve how much the
#    held-out loss falls, then measure it.
# 4. **Fine-tuning.** Start the code model from the prose model's weights (load its `state_dict`
#    before training). Does it reach a lower code loss in 200 steps than from scratch?
# 5. **Science at scale.** With `what_fits`, find the largest model whose model states fit on
#    64 GPUs of 80 GB at stage 3. Then add activations with `estimate_activations` for sequences of
#    1,024 tokens: how many layers of width 5,120 leave room for a micro-batch of 1?
#
# ## Summary
#
# - Generation is a loop around the model: score, draw, append. Temperature, top-k and top-p
#   only change the distribution drawn from (`ds_lab/generate.py`, held to its definition by
#   `tests/test_generate.py`).
# - A 2-layer GPT trained for a minute on 2 ranks goes from about 5.5 nats per byte (uniform) to
#   well under 3 on prose it never saw. Its samples have the corpus's words and rhythm, not its
#   sense.
# - The same model trained on code learns the byte statistics of Python, not its meaning: its
#   completions are not code. Each model is best on its own kind of text, and some of what it
#   learns carries over to the other.
# - §6.3's science applications are a matter of scale and data. The estimator says what a 15B
#   protein model's training states need per GPU (240 GB without ZeRO, 30 GB with ZeRO-3 on 8
#   GPUs). The data, the compute time and the experimental checks are beyond any notebook.
