"""What the benchmark runs share: command line and run sizes (``common``), random models and adapters
(``models``), arrival traces and training data (``workload``), replays of our engine (``replay``) and of
the transformers / PEFT baselines (``baselines_hf``), metrics and the report pages (``metrics``,
``report``)."""
