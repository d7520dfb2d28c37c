"""Small models built in code for the transform tests (passes/equalize.py, passes/smoothquant.py): a CNN with
depthwise and grouped convolutions, ReLU6, MaxPool, LeakyRelu, PRelu, a residual block and a global-pool head;
a BERT-style encoder with LayerNorm outlier channels."""

import numpy as np, onnx
from onnx import helper, numpy_helper, TensorProto

def cnn(seed=0, spread=3.0):
    """Conv -> Relu -> depthwise Conv (pad 1) -> Clip(0,6) -> Conv 1x1 -> Relu -> MaxPool -> grouped Conv ->
    Relu -> residual Add -> GAP -> Flatten -> Gemm"""
    rng = np.random.default_rng(seed)
    inits = []
    def w(name, shape, spread_axis=0):
        v = rng.normal(0, 1, shape)
        f = np.exp(rng.normal(0, spread, shape[spread_axis])) if spread else np.ones(shape[spread_axis])
        sh = [1]*len(shape); sh[spread_axis] = -1
        v = v * f.reshape(sh) / np.sqrt(np.prod(shape[1:]))
        inits.append(numpy_helper.from_array(v.astype(np.float32), name)); return name
    def b(name, n, scale=0.5):
        inits.append(numpy_helper.from_array(rng.normal(0, scale, n).astype(np.float32), name)); return name
    def const(name, v):
        inits.append(numpy_helper.from_array(np.asarray(v, np.float32), name)); return name
    N = [
        helper.make_node("Conv", ["x", w("w1", (16, 3, 3, 3)), b("b1", 16)], ["c1"], pads=[1,1,1,1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", w("w2", (16, 1, 3, 3)), b("b2", 16)], ["c2"], pads=[1,1,1,1], group=16, name="dw2"),
        helper.make_node("Clip", ["c2", const("lo", 0.0), const("hi", 6.0)], ["r2"], name="relu6_2"),
        helper.make_node("Conv", ["r2", w("w3", (24, 16, 1, 1)), b("b3", 24)], ["c3"], name="pw3"),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("MaxPool", ["r3"], ["p3"], kernel_shape=[2,2], strides=[2,2], name="pool3"),
        helper.make_node("Conv", ["p3", w("w4", (24, 6, 1, 1)), b("b4", 24)], ["c4"], group=4, name="gconv4"),
        helper.make_node("LeakyRelu", ["c4"], ["r4"], alpha=0.1, name="lrelu4"),
        helper.make_node("Conv", ["r4", w("w5", (24, 24, 3, 3)), b("b5", 24)], ["c5"], pads=[1,1,1,1], name="conv5"),
        helper.make_node("Add", ["c5", "p3"], ["a5"], name="res5"),
        helper.make_node("Relu", ["a5"], ["r5"], name="relu5"),
        helper.make_node("Conv", ["r5", w("w6", (32, 24, 1, 1)), b("b6", 32)], ["c6"], name="conv6"),
        helper.make_node("PRelu", ["c6", const("slope", rng.uniform(0, .3, (32, 1, 1)))], ["r6"], name="prelu6"),
        helper.make_node("GlobalAveragePool", ["r6"], ["g6"], name="gap"),
        helper.make_node("Flatten", ["g6"], ["f6"], name="flat"),
        helper.make_node("Gemm", ["f6", w("w7", (10, 32), 1), b("b7", 10)], ["y"], transB=1, name="fc"),
    ]
    g = helper.make_graph(N, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(m, full_check=True)
    return m

def bert(seed=0, D=32, H=2, T=8, F=64, outlier=20.0, layers=1):
    """embedding input x [B,T,D] -> per layer: LN -> Q,K,V MatMul+Add -> attention -> out proj -> residual -> LN
    -> FC1 + GELU -> FC2 -> residual; a Gemm-free classifier head on the first token."""
    rng = np.random.default_rng(seed)
    inits = []
    def c(name, v):
        inits.append(numpy_helper.from_array(np.asarray(v, np.float32), name)); return name
    nodes = []
    x = "x"
    dh = D // H
    for l in range(layers):
        p = f"l{l}_"
        gamma = np.ones(D); gamma[rng.choice(D, 3, replace=False)] = outlier  # outlier channels, as in trained LNs
        nodes.append(helper.make_node("LayerNormalization", [x, c(p+"g1", gamma), c(p+"b1", rng.normal(0, .1, D))], [p+"ln1"], axis=-1, epsilon=1e-5, name=p+"ln1"))
        for nm in "qkv":
            nodes.append(helper.make_node("MatMul", [p+"ln1", c(p+"w"+nm, rng.normal(0, 1/np.sqrt(D), (D, D)))], [p+nm+"0"], name=p+nm))
            nodes.append(helper.make_node("Add", [p+nm+"0", c(p+"b"+nm, rng.normal(0, .1, D))], [p+nm+"1"], name=p+nm+"_bias"))
            nodes.append(helper.make_node("Reshape", [p+nm+"1", c(p+"shape"+nm, np.array([0, 0, H, dh]))], [p+nm+"2"], name=p+nm+"_reshape"))
            perm = [0, 2, 3, 1] if nm == "k" else [0, 2, 1, 3]
            nodes.append(helper.make_node("Transpose", [p+nm+"2"], [p+nm+"3"], perm=perm, name=p+nm+"_t"))
        for i in list(inits):  # the reshape targets are int64
            if i.name.startswith(p+"shape"):
                inits.remove(i); inits.append(numpy_helper.from_array(np.array([0, 0, H, dh], np.int64), i.name))
        nodes.append(helper.make_node("MatMul", [p+"q3", p+"k3"], [p+"s0"], name=p+"qk"))
        nodes.append(helper.make_node("Mul", [p+"s0", c(p+"scale", 1/np.sqrt(dh))], [p+"s1"], name=p+"qk_scale"))
        nodes.append(helper.make_node("Softmax", [p+"s1"], [p+"a"], axis=-1, name=p+"softmax"))
        nodes.append(helper.make_node("MatMul", [p+"a", p+"v3"], [p+"ctx0"], name=p+"av"))
        nodes.append(helper.make_node("Transpose", [p+"ctx0"], [p+"ctx1"], perm=[0, 2, 1, 3], name=p+"ctx_t"))
        inits.append(numpy_helper.from_array(np.array([0, 0, D], np.int64), p+"shape_ctx"))
        nodes.append(helper.make_node("Reshape", [p+"ctx1", p+"shape_ctx"], [p+"ctx2"], name=p+"ctx_reshape"))
        nodes.append(helper.make_node("MatMul", [p+"ctx2", c(p+"wo", rng.normal(0, 1/np.sqrt(D), (D, D)))], [p+"o0"], name=p+"o"))
        nodes.append(helper.make_node("Add", [p+"o0", c(p+"bo", rng.normal(0, .1, D))], [p+"o1"], name=p+"o_bias"))
        nodes.append(helper.make_node("Add", [p+"o1", x], [p+"r1"], name=p+"res1"))
        g2 = np.ones(D); g2[rng.choice(D, 2, replace=False)] = outlier
        nodes.append(helper.make_node("LayerNormalization", [p+"r1", c(p+"g2", g2), c(p+"b2", rng.normal(0, .1, D))], [p+"ln2"], axis=-1, epsilon=1e-5, name=p+"ln2"))
        nodes.append(helper.make_node("MatMul", [p+"ln2", c(p+"w1", rng.normal(0, 1/np.sqrt(D), (D, F)))], [p+"f0"], name=p+"fc1"))
        nodes.append(helper.make_node("Add", [p+"f0", c(p+"bf1", rng.normal(0, .1, F))], [p+"f1"], name=p+"fc1_bias"))
        nodes.append(helper.make_node("Gelu", [p+"f1"], [p+"f2"], name=p+"gelu", domain=""))
        nodes.append(helper.make_node("MatMul", [p+"f2", c(p+"w2", rng.normal(0, 1/np.sqrt(F), (F, D)))], [p+"f3"], name=p+"fc2"))
        nodes.append(helper.make_node("Add", [p+"f3", c(p+"bf2", rng.normal(0, .1, D))], [p+"f4"], name=p+"fc2_bias"))
        nodes.append(helper.make_node("Add", [p+"f4", p+"r1"], [p+"out"], name=p+"res2"))
        x = p+"out"
    g = helper.make_graph(nodes, "bert", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", T, D])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["B", T, D])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(m, full_check=True)
    return m


def mlp(seed=0, spread=2.0):
    """Gemm(transB=1) -> Relu -> Gemm(transB=0, no bias, alpha 0.5) -> Relu -> MatMul + Add -> Relu -> MatMul"""
    rng = np.random.default_rng(seed)
    inits = []
    def c(name, v):
        inits.append(numpy_helper.from_array(np.asarray(v, np.float32), name)); return name
    def spread_w(shape, axis):
        f = np.exp(rng.normal(0, spread, shape[axis])); sh = [1, 1]; sh[axis] = -1
        return rng.normal(0, 1, shape) * f.reshape(sh) / np.sqrt(shape[1 - axis])
    N = [
        helper.make_node("Gemm", ["x", c("w1", spread_w((24, 12), 0)), c("b1", rng.normal(0, .5, 24))], ["h1"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("Gemm", ["a1", c("w2", spread_w((24, 16), 1))], ["h2"], alpha=0.5, name="fc2"),
        helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
        helper.make_node("MatMul", ["a2", c("w3", spread_w((16, 20), 1))], ["h3"], name="fc3"),
        helper.make_node("Add", ["h3", c("b3", rng.normal(0, .5, 20))], ["h3b"], name="fc3_bias"),
        helper.make_node("Relu", ["h3b"], ["a3"], name="relu3"),
        helper.make_node("MatMul", ["a3", c("w4", spread_w((20, 5), 1))], ["y"], name="fc4"),
    ]
    g = helper.make_graph(N, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(m, full_check=True)
    return m


def absorb_cnn(seed=0):
    """Conv (large positive biases) -> Relu -> Conv 1x1 (unpadded): the Relu input stays positive in most
    channels, so bias absorption applies."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.normal(0, 0.05, (8, 3, 3, 3))).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.uniform(2.0, 4.0, 8).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (6, 8, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 0.3, 6).astype(np.float32), "b2")]
    N = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
         helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2")]
    g = helper.make_graph(N, "absorb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(m, full_check=True)
    return m


def image_batches(seed=1, n=64, shape=(3, 16, 16), batch=16):
    x = np.random.default_rng(seed).normal(0, 1, (n,) + tuple(shape)).astype(np.float32)
    return [{"x": x[i:i + batch]} for i in range(0, n, batch)]


def se_cnn(seed=0):
    """MobileNetV3 / EfficientNet-style block: Conv -> BatchNorm -> Relu -> depthwise Conv -> Relu -> SE (GAP
    -> Conv 1x1 -> Relu -> Conv 1x1 -> HardSigmoid -> Mul) -> Conv 1x1 project -> residual Add -> Conv 1x1 ->
    HardSwish -> GAP -> Flatten -> Gemm"""
    rng = np.random.default_rng(seed)
    inits = []
    def c(name, v):
        inits.append(numpy_helper.from_array(np.asarray(v, np.float32), name)); return name
    def w(shape):
        f = np.exp(rng.normal(0, 1.0, shape[0])).reshape((-1,) + (1,) * (len(shape) - 1))
        return rng.normal(0, 1, shape) * f / np.sqrt(np.prod(shape[1:]))
    N = [
        helper.make_node("Conv", ["x", c("w0", w((16, 3, 3, 3)))], ["c0"], pads=[1, 1, 1, 1], name="stem"),
        helper.make_node("BatchNormalization", ["c0", c("g0", rng.uniform(.5, 2, 16)), c("be0", rng.normal(0, .3, 16)),
                                                c("m0", rng.normal(0, .2, 16)), c("v0", rng.uniform(.5, 2, 16))], ["n0"], name="bn0"),
        helper.make_node("Relu", ["n0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", c("w1", w((16, 1, 3, 3))), c("b1", rng.normal(0, .3, 16))], ["c1"], pads=[1, 1, 1, 1], group=16, name="dw1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["s0"], name="se_pool"),
        helper.make_node("Conv", ["s0", c("ws1", w((4, 16, 1, 1))), c("bs1", rng.normal(0, .3, 4))], ["s1"], name="se_reduce"),
        helper.make_node("Relu", ["s1"], ["s2"], name="se_relu"),
        helper.make_node("Conv", ["s2", c("ws2", w((16, 4, 1, 1))), c("bs2", rng.normal(0, .3, 16))], ["s3"], name="se_expand"),
        helper.make_node("HardSigmoid", ["s3"], ["s4"], alpha=1 / 6, beta=0.5, name="se_gate"),
        helper.make_node("Mul", ["r1", "s4"], ["e1"], name="se_scale"),
        helper.make_node("Conv", ["e1", c("w2", w((16, 16, 1, 1))), c("b2", rng.normal(0, .3, 16))], ["c2"], name="project"),
        helper.make_node("Add", ["c2", "r0"], ["a2"], name="residual"),
        helper.make_node("Conv", ["a2", c("w3", w((24, 16, 1, 1))), c("b3", rng.normal(0, .3, 24))], ["c3"], name="head_conv"),
        helper.make_node("HardSwish", ["c3"], ["h3"], name="hswish"),
        helper.make_node("GlobalAveragePool", ["h3"], ["g3"], name="gap"),
        helper.make_node("Flatten", ["g3"], ["f3"], name="flat"),
        helper.make_node("Gemm", ["f3", c("w4", rng.normal(0, .3, (10, 24))), c("b4", rng.normal(0, .3, 10))], ["y"], transB=1, name="fc"),
    ]
    g = helper.make_graph(N, "se_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(m, full_check=True)
    return m


def cnn_files(tmp_path):
    """The transform CNN (spread 1) saved as tmp_path/cnn.onnx and 32 calibration samples as tmp_path/calib/*.npz:
    (model path, calibration folder), for CLI tests."""
    path = tmp_path / "cnn.onnx"
    onnx.save(cnn(spread=1.0), str(path))
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, b in enumerate(image_batches(n=32)):
        np.savez(calib / f"{i:03d}.npz", **b)
    return path, calib

