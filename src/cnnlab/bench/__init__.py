"""cnnlab-bench: how fast cnnlab trains, measured against the article's own loop. `run` prints
the table of the sections cfg.bench.sections names, one module each (article, step, tracking,
ui, startup, batch_sizes, datasets, parallel, ddp, sweeps for sweep and search); `harness` holds
what they share (timed loops, alternating rounds, the processes they start), and `servers` the
real mlflow server and proxy that the tracking section and cnnlab's tests run."""
