"""verify/measure.measure_outputs: the one measurement of a quantized model against FP32 outputs at hand, used
by quantize's summary and by BatchNorm recalibration's guard: the same numbers as a direct numpy comparison,
labels give accuracy, the last batch is cut at ``samples``."""
import numpy as np
import onnx

import onnxfp8
from onnxfp8.calibrators.data import Samples, as_data, output_batch_axes
from onnxfp8.modelio import make_session
from onnxfp8.verify.compare import sqnr_db
from onnxfp8.verify.measure import measure_outputs


def test_measure_outputs_matches_numpy_and_the_summary(example_models):
    ex = example_models["mlp"]
    fp32 = onnx.load(ex["model"])
    res = onnxfp8.quantize(fp32, str(ex["calib"]), config=onnxfp8.QuantConfig(format="int8", summary_samples=20,
                                                                               batch_size=8))
    data = as_data(str(ex["calib"]), fp32, batch_size=8)
    inputs = list(data.batches())
    ref_sess, q_sess = make_session(fp32, level="basic"), make_session(res.model, level="basic")
    name = ref_sess.get_outputs()[0].name
    refs = [{name: ref_sess.run([name], b)[0]} for b in inputs]
    m = measure_outputs(res.model, inputs, refs, samples=20, axes=data.axes, out_axes=output_batch_axes(fp32, data))
    assert m.samples == 20  # 8 + 8 + 4 of the third batch
    x = np.concatenate([b["x"] if "x" in b else next(iter(b.values())) for b in inputs])[:20]
    feed = {next(iter(inputs[0])): x}
    want = sqnr_db(ref_sess.run([name], feed)[0], q_sess.run([name], feed)[0])
    assert abs(m.sqnr()[name] - want) < 1e-6
    assert m.to_dict() == res.report.outputs  # the summary is this measurement
    labels = np.argmax(np.concatenate([r[name] for r in refs]), axis=1)  # FP32's own answers as labels
    lab = measure_outputs(res.model, inputs, refs, labels=labels)
    assert lab.samples == 32 and lab.accuracy()[name] == lab.top1_agreement()[name]
    assert lab.classifiers[name].accuracy_fp32 == 1.0
    # a DataSource with labels is the same input as the batches and the labels apart
    src = Samples(inputs, labels)
    assert measure_outputs(res.model, src, refs).to_dict() == lab.to_dict()
