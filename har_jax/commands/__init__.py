"""The console commands of pyproject.toml's [project.scripts], one module each.

  har-train             train.py            = python main.py
  har-predict           predict.py          = python scripts/predict.py
  har-stream            stream.py           = python scripts/stream.py
  har-export            export.py           = python scripts/export.py
  har-prepare-ucf101    prepare_ucf101.py   = python scripts/prepare_ucf101.py
  har-prepare-videos    prepare_videos.py   = python scripts/prepare_video_folder.py
  har-run-splits        run_splits.py       = python scripts/run_splits.py
  har-convert-weights   convert_weights.py  = python scripts/convert_weights.py

Each module has `define_flags()`, `main(argv)` and `run()`, the entry point, which defines the
flags and hands `main` to `cli.run` (the exit codes are in har_jax/cli.py). Flags are defined only
by `run()`, so importing a command defines none. main.py and the scripts only call `run()`.
"""
