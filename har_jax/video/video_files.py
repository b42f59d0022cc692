"""Opening video files with PyAV safely: plain local files in video containers only.

  with video_files.open_video(path) as container:  # VideoError: a clear reason.
    for frame in container.decode(video=0): ...

FFmpeg reads a path like 'a:b.mp4' as protocol 'a', and follows playlists (HLS .m3u8, concat
lists) to whatever files they name, whatever the file is called. Here the path is made absolute
(no protocol), only the 'file' protocol is allowed, and only the demuxers of video containers.
"""

import os

import av
import numpy as np

from har_jax import errors

# FFmpeg demuxers of video containers and raw video streams ('mov' covers mp4/m4v/3gp, 'matroska'
# covers webm). Playlists and other indirections (hls, concat, dash, image2...) are left out.
VIDEO_DEMUXERS = ('avi', 'mov', 'matroska', 'mpegts', 'mpeg', 'flv', 'asf', 'ogg', 'mxf', 'nut',
                  'ivf', 'gif', 'h264', 'hevc', 'm4v', 'mpegvideo', 'yuv4mpegpipe', 'mjpeg')


class VideoError(errors.UserError):
  """One video file that cannot be read. Callers that process many files (predict.py) report it
  and go on with the next file."""


def open_video(path: str):
  """Opens a local video file for reading with PyAV (use as a context manager).

  Raises:
    VideoError: no such file, a directory, or not a video container (e.g. a playlist).
    av.error.FFmpegError: the container is damaged.
  """
  if os.path.isdir(path):
    raise VideoError('is a directory, not a video file.')
  if not os.path.isfile(path):
    raise VideoError('no such file.')
  try:
    return av.open(os.path.abspath(path), options={
        'format_whitelist': ','.join(VIDEO_DEMUXERS), 'protocol_whitelist': 'file'})
  except av.error.ArgumentError:  # FFmpeg's answer to a demuxer that is not on the list.
    raise VideoError(
        'not a video container that is accepted; playlists (.m3u8) and other files that point '
        f'to other files are refused. Accepted: {", ".join(VIDEO_DEMUXERS)}.') from None


def upright(image: np.ndarray, rotation) -> np.ndarray:
  """Applies a display rotation (degrees counter-clockwise, as PyAV reports it) to [H, W, 3]."""
  quarter_turns = int(round((rotation or 0) / 90.0)) % 4
  return np.ascontiguousarray(np.rot90(image, quarter_turns)) if quarter_turns else image
