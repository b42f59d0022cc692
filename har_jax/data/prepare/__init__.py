"""Dataset preparation: builds what the input pipeline reads. Training, evaluation and inference
never import this package (tests/test_structure.py checks); the one exception is the built-in
synthetic set, generated on first use where the pipeline opens it (`datasets.get_builder`).

  ucf101.py              UCF101 records (stock and with metadata) and the UCF101 frame store
  video_folder.py        your own videos, one folder per class, as TFDS records
  synthetic_actions.py   the built-in synthetic set (time-reversal pairs)
  frame_store_writer.py  writes frame stores; converts TFDS records into one
  common.py              what the builders share: thread map, JPEG encoding, results
"""
