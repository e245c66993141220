"""Train the projectors that align a FROZEN vision encoder with a FROZEN text encoder (the library behind
``align train``, ``accelerate launch align/train.py`` and ``accelerate launch -m align.train``).

* Two data paths (``train.source``): ``cache`` — features extracted once by :mod:`align.features` (checked as
  ``align extract`` checks them: missing shards extracted, damaged files encoded again, stale data refused),
  optionally several cached crops per image of which each epoch picks one per pair; ``encoders`` — images decoded,
  randomly cropped/flipped and run through the frozen encoders at every step (the paper's way).
  :mod:`align.training.caches`, :mod:`align.training.batches`.
* accelerate ``Accelerator`` (mixed precision, DDP across processes, trackers), gradient accumulation, AdamW with
  weight decay only on matrices (no decay for norms, biases, temperature), linear warm-up + cosine decay, seeded.
  :mod:`align.training.trainer`.
* Sample order: a seeded permutation of all caption–image pairs per epoch, cut into global batches (each
  process takes its slice). Checkpoints (``accelerator.save_state`` into a temporary folder renamed into place,
  so a kill never leaves a half-written checkpoint) record epoch and batch position, the run's first and recent
  losses, and the size + sha256 of every file; a rerun verifies them, resumes from the latest one and skips the
  consumed batches, so kill + resume equals an uninterrupted run (a damaged RNG state is refused unless
  ``--ignore-rng-state``). :mod:`align.training.checkpoints`.
* Progress bar with loss, samples/s and the share of time spent waiting for data; logs through accelerate's
  ``log_with`` (tensorboard when installed, else a JSONL tracker, :mod:`align.training.trackers`); validation
  retrieval R@1/5/10 (``align.eval.retrieval``) on the held-out ``val`` split from cached features every
  ``val_every`` steps / epoch; export with :class:`align.model.AlignedModel`.
* Text-encoder swap (``train.lock_image_from``): a trained model's image head loaded and locked, only a new text
  head (+ temperature) trained, saved as a new model. :mod:`align.training.lock`.
* The command line (``align train [--processes N]``, the script entry): :mod:`align.training.program`.
"""

from align.training.batches import CacheBatches, EncoderBatches, EpochPlan
from align.training.caches import (expected_key, extract_split, load_encoders, open_checked, pooled_part,
                                   split_data, split_features_config)
from align.training.checkpoints import (CHECKSUMS, CKPT_PREFIX, TrainState, latest_checkpoint, resume_checkpoint,
                                        save_checkpoint, verify_checkpoint)
from align.training.lock import LockedImageHead, load_locked_image_head
from align.training.program import ERROR_DIR_ENV, build_parser, launch, main, run
from align.training.trackers import make_trackers
from align.training.trainer import AlignTask, StepCallback, Trainer, param_groups, train, validate, warmup_cosine

__all__ = ["CacheBatches", "EncoderBatches", "EpochPlan", "expected_key", "extract_split", "load_encoders",
           "open_checked", "pooled_part", "split_data", "split_features_config", "CHECKSUMS", "CKPT_PREFIX",
           "TrainState", "latest_checkpoint", "resume_checkpoint", "save_checkpoint", "verify_checkpoint",
           "LockedImageHead", "load_locked_image_head", "ERROR_DIR_ENV", "build_parser", "launch", "main", "run", "make_trackers", "AlignTask", "StepCallback",
           "Trainer", "param_groups", "train", "validate", "warmup_cosine"]
