"""TensorBoard event files without torch: the summaries cnnpipe logs (scalars, images, histograms, text and the
HParams plugin's records) built from the tensorboard package's own protos and written by its EventFileWriter. The
events are what torch.utils.tensorboard's SummaryWriter writes for the same calls, without importing torch, whose
import was most of a training run's start-up time and memory (the figures: docs/bench.md's start-up section).

    w = EventWriter(run_dir, purge_step=None)
    w.scalars({"train/loss": 0.3, "train/lr": 0.05}, step)      # one event for many tags
    w.image(tag, hwc_uint8, step)                                # PNG (several images: tile them first)
    w.histogram(tag, values, step); w.text(tag, "...", step)     # the text's tag gets "/text_summary", as torch's
    w.hparams(settings, metric_tags, step); w.hparams_end(step)  # one row of the HParams dashboard
    w.flush(); w.close()
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.plugins.hparams import metadata as hp_metadata
from tensorboard.plugins.text.plugin_data_pb2 import TextPluginData
from tensorboard.summary.writer.event_file_writer import EventFileWriter


def _tf_buckets() -> np.ndarray:
    """TensorFlow's histogram bucket edges (torch's add_histogram default): ±1e-12 growing by 10 % up to 1e20."""
    v, pos = 1e-12, []
    while v < 1e20:
        pos.append(v)
        v *= 1.1
    return np.array([-x for x in reversed(pos)] + [0.0] + pos)


BUCKETS = _tf_buckets()


class EventWriter:
    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        self.events = EventFileWriter(str(log_dir), max_queue_size=10, flush_secs=120)
        Image.preinit()                     # PIL's PNG encoder loads now, once a run, not in the first image's step
        if purge_step is not None:          # a resumed run: TensorBoard drops the earlier attempt's events from here
            self.events.add_event(Event(step=purge_step, wall_time=time.time(), file_version="brain.Event:2"))
            self.events.add_event(Event(step=purge_step, wall_time=time.time(),
                                        session_log=SessionLog(status=SessionLog.START)))

    def write(self, values: list[Summary.Value], step: int) -> None:
        self.events.add_event(Event(summary=Summary(value=values), step=int(step), wall_time=time.time()))

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.write([Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()], step)

    def image(self, tag: str, img: np.ndarray, step: int) -> None:
        """img uint8 H,W,3 (or H,W,1), stored as PNG."""
        img = np.asarray(img)
        if img.dtype != np.uint8 or img.ndim != 3:
            raise ValueError(f"{tag}: an image is uint8 H,W,C; got {img.dtype} {img.shape}")
        png = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(png, format="PNG")
        H, W, C = img.shape
        self.write([Summary.Value(tag=tag, image=Summary.Image(height=H, width=W, colorspace=C,
                                                                encoded_image_string=png.getvalue()))], step)

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        """The values counted in TensorFlow's buckets, the empty ones at both ends left out."""
        v = np.asarray(values, dtype=np.float64).ravel()
        counts, limits = np.histogram(v, bins=BUCKETS)
        used = np.flatnonzero(counts)
        lo, hi = (used[0], used[-1] + 1) if len(used) else (0, 1)
        # TensorBoard reads each bucket's right edge: an empty bucket on the left keeps the leftmost edge
        counts = np.concatenate([[0], counts[lo:hi]]) if lo == 0 else counts[lo - 1:hi]
        self.write([Summary.Value(tag=tag, histo=HistogramProto(
            min=float(v.min()), max=float(v.max()), num=len(v), sum=float(v.sum()), sum_squares=float(v @ v),
            bucket_limit=limits[lo:hi + 1].tolist(), bucket=counts.tolist()))], step)

    def text(self, tag: str, text: str, step: int) -> None:
        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
            plugin_name="text", content=TextPluginData(version=0).SerializeToString()))
        tensor = TensorProto(dtype="DT_STRING", string_val=[text.encode("utf-8")],
                             tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
        self.write([Summary.Value(tag=f"{tag}/text_summary", metadata=meta, tensor=tensor)], step)

    def hparams(self, settings: dict[str, str | float | int], metric_tags: list[str], step: int) -> None:
        """The HParams dashboard's experiment (columns: the settings and the metrics) and this run's session
        start (its values); the metrics themselves are ordinary scalars under metric_tags."""
        start = plugin_data_pb2.SessionStartInfo()
        infos = []
        for name, value in settings.items():
            if value is None:
                continue
            if isinstance(value, str):
                start.hparams[name].string_value = value
                kind = "DATA_TYPE_STRING"
            else:
                start.hparams[name].number_value = float(value)
                kind = "DATA_TYPE_FLOAT64"
            infos.append(api_pb2.HParamInfo(name=name, type=api_pb2.DataType.Value(kind)))
        experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=[
            api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t)) for t in metric_tags])
        self.write([_hparams_value(hp_metadata.EXPERIMENT_TAG, experiment=experiment)], step)
        self.write([_hparams_value(hp_metadata.SESSION_START_INFO_TAG, session_start_info=start)], step)

    def hparams_end(self, step: int) -> None:
        end = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value("STATUS_SUCCESS"))
        self.write([_hparams_value(hp_metadata.SESSION_END_INFO_TAG, session_end_info=end)], step)

    def flush(self) -> None:
        self.events.flush()

    def close(self) -> None:
        self.events.close()


def _hparams_value(tag: str, **record) -> Summary.Value:
    content = plugin_data_pb2.HParamsPluginData(version=hp_metadata.PLUGIN_DATA_VERSION, **record)
    return Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
        plugin_name=hp_metadata.PLUGIN_NAME, content=content.SerializeToString())))
