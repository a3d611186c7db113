"""The training benchmark behind ``tools/bench_training.py``: early-exit pipeline training
against megatron-core's own 1F1B schedule.

* ``cases``: the settings, the models and the configurations of each suite (``SUITES``);
* ``measure``: round-robin timing, saved-activation and peak memory, the suite's spawned ranks;
* ``report``: rows (what ``--json`` writes), the printed table, the machine description;
* ``cli``: flags and the whole run (:func:`~.cli.main`).

What is measured and how: ``docs/benchmarks/training.md``. In short: the benchmark spawns its
own ranks (``launch.run_distributed``: gloo on CPU, NCCL on GPU; one process per pipeline stage)
and prints one table per suite, every number measured in this run:

* ``pp2`` (2 ranks): megatron-core's ``forward_backward_pipelining_without_interleaving`` on a
  plain ``GPTModel`` with our backbone spec (the baseline) against our executor
  (``pipeline/schedule.run_pipeline``) on ``EarlyExitGPTModel`` with no exits, and with one
  untied norm exit at the end of stage 0, deferred exits on and off.
* ``pp4`` (4 ranks): exits at the end of stages 0, 1 and 2; bubble filling off, on with the
  default counts (``FillConfig()``: warm-up and cool-down fills), and warm-up fills only.

Timing: configurations run round-robin (the starting configuration rotates every round) so that
machine noise hits all of them alike; each iteration is fenced by barriers, so its wall time is
the slowest rank's. Reported: the wall median, interquartile range and minimum, their ratios to
the suite's baseline (first row), and the median of per-round paired ratios (each configuration
over the baseline of the same round). Each rank also records its process CPU time per iteration
(gloo waits block without spinning, so this is the stage's own work: compute, exit heads, p2p
copies); its median per stage, and the busiest and total stage CPU over the baseline's, hold up
when other jobs load the machine and wall times do not. An iteration is the schedule call only
(forward, exit and final losses, backward, p2p); gradient finalisation and the optimizer step
are the same for every configuration and are left out.

Memory, per stage, one untimed iteration per configuration after the timed rounds:

* ``saved``: the peak, over the iteration, of the bytes of distinct non-parameter storages that
  autograd holds for backward (``torch.autograd.graph.saved_tensors_hooks``; a storage counts from
  the first time it is saved until the last graph node holding it is freed). This is activation
  memory as 1F1B reasons about it, device-independent and deterministic.
* ``peak``: on CPU the peak resident set size during the iteration minus the resident set size at
  its start (``malloc_trim`` first, the peak reset through ``/proc/self/clear_refs``), which adds
  temporaries, gradient buffers touched for the first time and communication buffers, and is
  blurred by the allocator; on GPU the platform's peak allocated bytes minus the bytes allocated
  at the start.
"""
