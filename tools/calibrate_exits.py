r"""Learn-then-Test exit thresholds of a checkpoint, and their agreement on held-out windows.

    python tools/calibrate_exits.py --load CKPT \
        --calibration-text assets/brown-1.9.80/heldout.jsonl --targets 0.8 0.9 0.95 \
        --calibration-delta 0.1 --save-calibration-data runs/cal.pt
    python tools/calibrate_exits.py --load CKPT --calibration-data runs/cal.pt --targets 0.9

The method and its assumptions: ``megatron/early_exit/inference/calibrate.py``; the code:
``megatron/early_exit/bench/generation/calibrated.py``.
"""

from megatron.early_exit.bench.generation.calibrated import main

if __name__ == "__main__":
    main()
