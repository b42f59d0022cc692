"""The data layer: prepared datasets -> tf.data batches of uint8 clips.

  datasets.py           config.dataset -> a prepared dataset (`open_source`); splits, class names
  sources.py            `DataSource`, the interface the pipeline reads; split strings; clip seeds
  tfds_records.py       TFDS records (one per video) as a DataSource
  frame_store.py        frame stores (one record per frame): the format, its reader, a DataSource
  pipeline.py           train and eval datasets from a DataSource, sharded per host
  stages.py             the pure tf stages: sample, decode, crop, flip
  synthetic_classes.py  the built-in synthetic set's classes
  prepare/              dataset preparation (never imported by training, evaluation or inference)
"""
