r"""Miss rate of Learn-then-Test thresholds on synthetic scores with known agreement probability.

    python tools/calibration_coverage.py                # the documented table (a few minutes)
    python tools/calibration_coverage.py --targets 0.9 --num-seeds 30

The code: ``megatron/early_exit/bench/calibration_coverage.py``.
"""

from megatron.early_exit.bench.calibration_coverage import main

if __name__ == "__main__":
    main()
