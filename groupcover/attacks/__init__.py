"""Security evaluation: attacks against every obfuscation scheme on a fine-tuned victim.

`python -m groupcover attack --victim minilm-finetuned --schemes all --json PATH`. Modules:
`victim` (the fine-tune and its task), `core` (what an attack sees and returns, the metrics),
`methods` (the attacks), `adaptive_hardened` and `partition` (red-team steps against the hardened
scheme: the butterfly fit, the cross-LayerNorm link, the block partition from a noisy estimate),
`harness` (the evaluation and the model-stealing stage), `report`
(table, JSON, chart; matplotlib only for the chart).
"""
