"""Downstream probes: what a trained model's latents are worth (AIR paper, section 3.1.2).

The AIR paper's third claim: a small network trained on AIR's inferred latents learns the sum
of the digits in an image and whether they are in ascending order, from fewer labels than a CNN
trained on the pixels. The `representation` experiment (configs/experiments/representation.yaml,
docs/representation.md) measures it per variant and seed:

- `tasks`: the targets, from the data set's ground truth (digit labels and boxes);
- `features`: the frozen model's latents per step, in inference order, and the ground-truth
  latents the tests use to check that the probe itself can learn the tasks;
- `learners`: the latent probe (an MLP) and the pixel CNN, fitted on labelled training images
  only, scored on held-out test images;
- `suite`: every (task, budget, downstream seed) for one model, and the cached CNN baseline;
- `stage`: the worker's part: reuse a finished count run's model (or train one), run the suite,
  write the result.
"""
