"""Evaluation of a trained checkpoint (`megalm eval`): loss and perplexity on token files, zero- and
few-shot multiple-choice and cloze tasks scored by log-likelihood with contextual calibration and
label expansion (tasks.py: the JSONL format and the scoring arithmetic), and a built-in task drawn
from the embedded corpus's world (world.py). run.py loads the model and computes log-likelihoods."""
