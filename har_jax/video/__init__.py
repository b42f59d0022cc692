"""Video I/O with PyAV, for prediction and streaming (the input pipeline reads prepared datasets).

  video_files.py    opens local video files safely; turns frames upright
  video_sources.py  files, cameras, network streams and pipes, read on a thread
"""
