"""Evaluation of a trained checkpoint (`megalm eval`): loss and perplexity on token files, zero- and
few-shot multiple-choice and cloze tasks scored by log-likelihood with contextual calibration and
label expansion (tasks.py: the JSONL format and the scoring arithmetic), and a built-in task drawn
from the embedded corpus's world (world.py). evaluator.py loads the model at any layout and computes
log-likelihoods; harness.py is the lm-evaluation-harness adapter; run.py is the command line."""
