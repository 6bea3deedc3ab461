"""cnnpipe.events writes what torch.utils.tensorboard writes for the same calls (its protos compared field by field),
TensorBoard reads it back, and the trainer no longer imports torch for it."""
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard import summary as torch_summary

from cnnpipe.events import BUCKETS, EventWriter


def accumulator(run_dir):
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_tensorflow_buckets_are_torchs_default_bins(tmp_path):
    np.testing.assert_array_equal(BUCKETS, np.array(SummaryWriter(str(tmp_path)).default_bins))


@pytest.mark.parametrize("values", [np.random.default_rng(0).standard_normal(1000) * 3, np.full(5, 2.5),
                                    np.linspace(-1e-3, 1e-3, 7), np.zeros(3)], ids=["normal", "constant", "small",
                                                                                      "zeros"])
def test_histogram_is_torchs(tmp_path, values):
    w = EventWriter(tmp_path)
    w.histogram("h", values, 3)
    w.close()
    ours = accumulator(tmp_path).Histograms("h")[0].histogram_value
    theirs = torch_summary.make_histogram(values.astype(float), BUCKETS)
    assert (ours.min, ours.max, ours.num, ours.sum) == (theirs.min, theirs.max, theirs.num, theirs.sum)
    assert ours.sum_squares == pytest.approx(theirs.sum_squares)
    assert list(ours.bucket_limit) == list(theirs.bucket_limit) and list(ours.bucket) == list(theirs.bucket)


def test_an_image_is_torchs(tmp_path):
    img = np.random.default_rng(1).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)       # H,W,C
    w = EventWriter(tmp_path)
    w.image("one", img, 2)
    w.close()
    ours = accumulator(tmp_path).Images("one")[0]
    theirs = torch_summary.image("one", img, dataformats="HWC").value[0].image
    assert (ours.width, ours.height) == (theirs.width, theirs.height) == (7, 5)
    for encoded in (ours.encoded_image_string, theirs.encoded_image_string):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encoded))), img)


def test_text_and_hparams_are_torchs(tmp_path):
    from tensorboard.plugins.hparams import plugin_data_pb2
    settings = {"optim.lr": 0.05, "model.name": "lenet5", "conv.k": 5, "skipped": None}
    tags = ["hparams/test_acc", "hparams/val_loss"]
    w = EventWriter(tmp_path)
    w.text("train/stopped_early", "why it stopped", 7)
    w.hparams(settings, tags, 0)
    w.hparams_end(7)
    w.close()
    ea = accumulator(tmp_path)
    text = ea.Tensors("train/stopped_early/text_summary")[0].tensor_proto
    assert text == torch_summary.text("train/stopped_early", "why it stopped").value[0].tensor
    content = ea.PluginTagToContent("hparams")
    theirs = {v.tag: v.metadata.plugin_data.content
              for s in torch_summary.hparams(settings, dict.fromkeys(tags, 0.0)) for v in s.value}
    assert content.keys() == theirs.keys()
    for tag in content:
        ours, ref = (plugin_data_pb2.HParamsPluginData.FromString(c) for c in (content[tag], theirs[tag]))
        if ours.HasField("session_end_info"):                      # torch stamps the end time; we leave it out
            ref.session_end_info.ClearField("end_time_secs")
        assert ours == ref, tag


def test_a_purge_step_hides_the_interrupted_attempts_later_events(tmp_path):
    first = EventWriter(tmp_path)
    first.scalars({"train/loss": 1.0}, 5)
    first.scalars({"train/loss": 2.0}, 10)                        # written, then the run was interrupted at 5
    first.close()
    again = EventWriter(tmp_path, purge_step=5)
    again.scalars({"train/loss": 3.0}, 6)
    again.close()
    assert [(e.step, e.value) for e in accumulator(tmp_path).Scalars("train/loss")] == [(6, 3.0)]


def test_logging_a_run_does_not_import_torch(tmp_path):
    """The TensorBoard callback's writer path, in a fresh process: torch stays out of sys.modules."""
    code = ("import sys, numpy as np; from cnnpipe.events import EventWriter; "
            f"w = EventWriter({str(tmp_path)!r}); w.scalars({{'a': 1.0}}, 1); "
            "w.image('i', np.zeros((4, 4, 3), np.uint8), 1); w.histogram('h', np.arange(5.0), 1); "
            "w.text('t', 'x', 1); w.hparams({'k': 1.0}, ['hparams/m'], 1); w.close(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
