"""The post-processing converter of the TFLite backend: ONNX nodes after the heads -> TensorFlow ops, one node at
a time, in the ONNX layout. Runs in the onnx2tf environment (imported by builder.py); the toolkit side asks
`tail_ops()` only (nothing heavy is imported at module level).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class Unsupported(Exception):
    """A post-processing op (or attribute) the op-by-op converter does not handle."""


def tf_error_line(exc: BaseException) -> str:
    """The informative line of a TensorFlow / converter error (they are long and end in MLIR dumps)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for marker in ("TF Select ops:", "op is neither", "error:", "Error"):
        for line in lines:
            if marker in line:
                return line[:300]
    return lines[-1][:300] if lines else ""


def _tf() -> Any:
    import tensorflow as tf

    return tf


# ONNX ops that are one TensorFlow call on their inputs (paths under `tf.`); the others are `TailConverter.op_*`
_ELEMENTWISE = {
    "Add": "math.add", "Sub": "math.subtract", "Mul": "math.multiply", "Equal": "math.equal",
    "Less": "math.less", "And": "math.logical_and", "Where": "where",
    "Sigmoid": "math.sigmoid", "Relu": "nn.relu", "Identity": "identity", "MatMul": "linalg.matmul",
    "Round": "math.round",  # round half to even, like ONNX: TFLite ROUND (banker's rounding), delegated to XNNPACK
}  # fmt: skip


def tail_ops() -> set[str]:
    """The ONNX op types the post-processing converter handles."""
    return set(_ELEMENTWISE) | {name[3:] for name in vars(TailConverter) if name.startswith("op_")}


def text(value: Any) -> str:
    """An ONNX string attribute (bytes) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _compared_then_cast_to_float(graph: Any) -> set[str]:
    """Outputs of Greater nodes that only Cast nodes to float32 read (and that are no graph output)."""
    from onnx import TensorProto, helper

    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    found = set()
    for node in graph.node:
        out = node.output[0]
        if node.op_type != "Greater" or out in outputs or not readers.get(out):
            continue
        if all(r.op_type == "Cast" and any(a.name == "to" and helper.get_attribute_value(a) == TensorProto.FLOAT
                                           for a in r.attribute) for r in readers[out]):  # fmt: skip
            found.add(out)
    return found


def _pixel_sums(graph: Any) -> dict[str, tuple[str, str]]:
    """{output of the second MatMul: (the 3-D tensor X, the first ones row)} for the merge's pixel count `ones[1, W] @ reshape(ones[1, H] @
    reshape(X [H, W, S], [H, W*S]), [W, S])` (the two small GEMMs ONNX Runtime runs fastest). In TFLite one SUM over
    X's first two axes does it: measured on 256 x 256 x 101 floats, 2 threads, LiteRT 2.3, 0.6 ms against 1.7 ms
    for the two SUMs the GEMMs become (their first one accumulates 25,856 columns at once)."""
    from onnx import numpy_helper

    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {}
    for node in graph.node:
        for out in node.output:
            producer[out] = node
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def ones_row(name: str) -> bool:
        value = constants.get(name)
        return value is not None and value.ndim == 2 and value.shape[0] == 1 and bool(np.all(value == 1))

    def made_by(name: str, op: str) -> Any:
        node = producer.get(name)
        return node if node is not None and node.op_type == op else None

    found = {}
    for node in graph.node:
        if node.op_type != "MatMul" or not ones_row(node.input[0]):
            continue
        second_reshape = made_by(node.input[1], "Reshape")
        first = made_by(second_reshape.input[0], "MatMul") if second_reshape is not None else None
        if first is None or not ones_row(first.input[0]):
            continue
        first_reshape = made_by(first.input[1], "Reshape")
        if first_reshape is not None:
            found[node.output[0]] = (first_reshape.input[0], first.input[0])
    return found


def _step_scale(threshold: float) -> float | None:
    """A power of two S with (x - c) * S >= 1 (or +inf) for every float32 x > c, for a normal float32 c: then
    min(relu((x - c) * S), 1) is exactly 1.0 where x > c and 0.0 elsewhere. None where no safe S exists.

    Why: a float32 x != c has |x - c| >= |c| * 2**-25 (|x| < |c| / 2 gives more than |c| / 2; otherwise x lies in
    c's binade or a neighbour, where floats are at least ulp(c) / 2 apart), and x - c is never rounded to 0 or to
    the wrong sign; with |c| >= 2**-90 that difference is a normal number, so flushing denormals changes nothing."""
    c = np.float32(threshold)
    if not np.isfinite(c) or c == 0 or abs(c) < 2.0**-90 or abs(c) > 2.0**100:
        return None
    exponent = int(np.ceil(np.log2(2.0**25 / abs(float(c))))) + 1
    return float(2.0**exponent) if exponent <= 120 else None


class TailConverter:
    """ONNX post-processing -> TensorFlow ops with the same layout and semantics, one node at a time.

    It covers the ops our exporter emits after the heads (every graph: panoptic, raw, semantic, and the model's
    ablation switches); any other op is a one-line `Unsupported`. Values are numpy arrays while they are constants
    (initializers, shape arithmetic) and TF tensors otherwise; a node whose inputs are all constant is evaluated
    eagerly, so shapes, axes and K stay static.
    """

    def __init__(self, model: Any) -> None:
        import functools

        self.model = model
        self.elementwise = {op: functools.reduce(getattr, path.split("."), _tf()) for op, path in _ELEMENTWISE.items()}

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Any]:
        from onnx import helper, numpy_helper

        env: dict[str, Any] = {t.name: numpy_helper.to_array(t) for t in self.model.graph.initializer}
        env.update(inputs)
        as_float = _compared_then_cast_to_float(self.model.graph)
        pixel_sums = _pixel_sums(self.model.graph)
        for node in self.model.graph.node:
            if node.output[0] in pixel_sums and self._pixel_sum(env, node, *pixel_sums[node.output[0]]):
                continue
            args = [env[name] if name else None for name in node.input]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if node.output[0] in as_float:
                attrs["mcv_float_out"] = 1  # (not an ONNX attribute: our note that every reader casts to float)
            if node.op_type not in tail_ops() or node.domain not in ("", "ai.onnx"):
                raise Unsupported(f"op {node.op_type} (node {node.name or '?'}) has no TFLite conversion here")
            if node.op_type in self.elementwise:
                handler = self._elementwise(node.op_type)
            else:
                handler = getattr(self, f"op_{node.op_type}")
            if all(isinstance(a, np.ndarray) or a is None for a in args):
                with _tf().init_scope():  # constant inputs: fold now
                    outs = handler(args, attrs)
                outs = tuple(np.asarray(o) for o in outs) if isinstance(outs, tuple) else np.asarray(outs)
            else:
                outs = handler(args, attrs)
            for name, value in zip(node.output, outs if isinstance(outs, tuple) else (outs,), strict=False):
                if name:
                    env[name] = value
        return {o.name: env[o.name] for o in self.model.graph.output}

    def _pixel_sum(self, env: dict[str, Any], node: Any, source: str, first_ones: str) -> bool:
        """The `_pixel_sums` pattern as one SUM over the first two axes of its 3-D source, when the shapes are
        those of the pattern (else False: the MatMul is converted as written)."""
        tf = _tf()
        x, ones = env.get(source), env.get(node.input[0])
        if x is None or isinstance(x, np.ndarray) or len(x.shape) != 3:
            return False
        height, width, slots = self.shape(x)
        if np.shape(ones) != (1, width) or np.shape(env.get(first_ones)) != (1, height):
            return False
        env[node.output[0]] = tf.reshape(tf.math.reduce_sum(x, axis=[0, 1]), [1, slots])
        return True

    def _elementwise(self, op_type: str) -> Any:
        fn = self.elementwise[op_type]
        return lambda a, k: fn(*a)

    # -- helpers ----------------------------------------------------------------------------------------------
    @staticmethod
    def static(value: Any, what: str) -> np.ndarray:
        if isinstance(value, np.ndarray):
            return value
        folded = _tf().get_static_value(value)
        if folded is None:
            raise Unsupported(f"{what} must be a constant")
        return np.asarray(folded)

    @staticmethod
    def shape(value: Any) -> list[int]:
        shape = list(value.shape)
        if any(d is None for d in shape):
            raise Unsupported("dynamic shapes in the post-processing")
        return [int(d) for d in shape]

    def axes(self, args: list[Any], attrs: dict[str, Any]) -> list[int] | None:
        if "axes" in attrs:
            return [int(a) for a in attrs["axes"]]
        if len(args) > 1 and args[1] is not None:
            return [int(a) for a in self.static(args[1], "axes").reshape(-1)]
        return None

    # -- elementwise with attributes --------------------------------------------------------------------------
    def op_Cast(self, a: list[Any], k: dict[str, Any]) -> Any:
        from onnx import helper

        return _tf().cast(a[0], _tf().as_dtype(helper.tensor_dtype_to_np_dtype(int(k["to"]))))

    def op_Div(self, a: list[Any], k: dict[str, Any]) -> Any:
        """ONNX integer division rounds toward zero; TFLite has FLOOR_DIV only (and no int64 there: via int32)."""
        tf = _tf()
        x = tf.convert_to_tensor(a[0])
        if not x.dtype.is_integer:
            return tf.math.divide(x, a[1])
        xs, ys = tf.cast(x, tf.int32), tf.cast(a[1], tf.int32)
        floor = tf.math.floordiv(xs, ys)
        inexact = tf.math.not_equal(floor * ys, xs)
        signs_differ = tf.math.not_equal(tf.math.less(xs, 0), tf.math.less(ys, 0))
        return tf.cast(floor + tf.cast(tf.math.logical_and(inexact, signs_differ), tf.int32), x.dtype)

    def op_Clip(self, a: list[Any], k: dict[str, Any]) -> Any:
        tf = _tf()
        x = tf.convert_to_tensor(a[0])
        if len(a) > 1 and a[1] is not None:
            x = tf.math.maximum(x, tf.cast(a[1], x.dtype))
        if len(a) > 2 and a[2] is not None:
            x = tf.math.minimum(x, tf.cast(a[2], x.dtype))
        return x

    def op_HardSigmoid(self, a: list[Any], k: dict[str, Any]) -> Any:
        """min(relu(alpha * x + beta), 1): the TFLite converter fuses the Relu into the Add (one pass less than
        clip_by_value's MINIMUM + RELU); the same value for every non-NaN x."""
        tf = _tf()
        alpha, beta = float(k.get("alpha", 0.2)), float(k.get("beta", 0.5))
        return tf.math.minimum(tf.nn.relu(a[0] * alpha + beta), 1.0)

    def op_Greater(self, a: list[Any], k: dict[str, Any]) -> Any:
        """x > c. Where every reader casts the result to float and c is a float constant, it becomes
        min(relu((x - c) * S), 1), exactly 0.0 / 1.0 (`_step_scale`), three ops XNNPACK runs. Measured on
        256 x 256 x 101 floats, 2 threads, with the SUM that follows: LiteRT 2.1.0 (the onnx2tf environment) runs
        GREATER + CAST as reference kernels, 17-18 ms against ~4.5 ms; LiteRT 2.3.0 (the toolkit's runtime) has
        fast ones, 5.1 against 4.8 ms (neutral there)."""
        tf = _tf()
        if k.get("mcv_float_out") and isinstance(a[1], np.ndarray) and a[1].size == 1 \
                and not isinstance(a[0], np.ndarray) and a[0].dtype == tf.float32:  # fmt: skip
            scale = _step_scale(float(a[1].reshape(-1)[0]))
            if scale is not None:
                c = np.float32(a[1].reshape(-1)[0])
                return tf.math.minimum(tf.nn.relu((a[0] - c) * np.float32(scale)), 1.0)
        return tf.math.greater(a[0], a[1])

    # -- shapes -----------------------------------------------------------------------------------------------
    def op_Reshape(self, a: list[Any], k: dict[str, Any]) -> Any:
        target = [int(d) for d in self.static(a[1], "Reshape shape")]
        if not int(k.get("allowzero", 0)):
            current = self.shape(a[0])
            target = [current[i] if d == 0 else d for i, d in enumerate(target)]
        return _tf().reshape(a[0], target)

    def op_Flatten(self, a: list[Any], k: dict[str, Any]) -> Any:
        shape = self.shape(a[0])
        axis = int(k.get("axis", 1)) % (len(shape) or 1)
        return _tf().reshape(a[0], [int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))])

    def op_Transpose(self, a: list[Any], k: dict[str, Any]) -> Any:
        perm = k.get("perm")
        return _tf().transpose(a[0], perm=[int(p) for p in perm] if perm is not None else None)

    def op_Unsqueeze(self, a: list[Any], k: dict[str, Any]) -> Any:
        shape, axes = self.shape(a[0]), self.axes(a, k) or []
        for ax in sorted(ax % (len(shape) + len(axes)) for ax in axes):
            shape.insert(ax, 1)
        return _tf().reshape(a[0], shape)

    def op_Squeeze(self, a: list[Any], k: dict[str, Any]) -> Any:
        shape, axes = self.shape(a[0]), self.axes(a, k)
        drop = {i for i, d in enumerate(shape) if d == 1} if axes is None else {x % len(shape) for x in axes}
        return _tf().reshape(a[0], [d for i, d in enumerate(shape) if i not in drop])

    def op_Concat(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().concat(list(a), axis=int(k["axis"]))

    def op_Expand(self, a: list[Any], k: dict[str, Any]) -> Any:
        target = np.broadcast_shapes(tuple(self.shape(a[0])), tuple(int(d) for d in self.static(a[1], "Expand shape")))
        return _tf().broadcast_to(a[0], target)

    def op_Gather(self, a: list[Any], k: dict[str, Any]) -> Any:
        axis, indices = int(k.get("axis", 0)), a[1]
        if isinstance(indices, np.ndarray):
            indices = np.where(indices < 0, indices + self.shape(a[0])[axis], indices)
        return _tf().gather(a[0], indices, axis=axis)

    def op_GatherElements(self, a: list[Any], k: dict[str, Any]) -> Any:
        tf = _tf()
        data, indices = a[0], tf.convert_to_tensor(a[1])
        rank = len(self.shape(data))
        axis = int(k.get("axis", 0)) % rank
        grids = np.indices(self.shape(indices), dtype=indices.dtype.as_numpy_dtype)
        coords = [indices if i == axis else tf.constant(grids[i]) for i in range(rank)]
        return tf.gather_nd(data, tf.stack(coords, axis=-1))

    def op_Slice(self, a: list[Any], k: dict[str, Any]) -> Any:
        """Static starts / ends / axes / steps (the merge's `areas[1:]`)."""
        shape = self.shape(a[0])
        starts = [int(v) for v in self.static(a[1], "Slice starts").reshape(-1)]
        ends = [int(v) for v in self.static(a[2], "Slice ends").reshape(-1)]
        axes = [int(v) for v in self.static(a[3], "Slice axes").reshape(-1)] if len(a) > 3 and a[3] is not None \
            else list(range(len(starts)))  # fmt: skip
        steps = [int(v) for v in self.static(a[4], "Slice steps").reshape(-1)] if len(a) > 4 and a[4] is not None \
            else [1] * len(starts)  # fmt: skip
        index: list[slice] = [slice(None)] * len(shape)
        for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
            axis %= len(shape)
            index[axis] = slice(*slice(start, end, step).indices(shape[axis]))
        return a[0][tuple(index)]  # numpy arrays and TF tensors (one STRIDED_SLICE) take the same basic slicing

    def op_ScatterElements(self, a: list[Any], k: dict[str, Any]) -> Any:
        """1-D ScatterElements with reduction add (the owner histogram): data + UNSORTED_SEGMENT_SUM(updates)."""
        tf = _tf()
        if text(k.get("reduction", "none")) != "add" or len(self.shape(a[0])) != 1:
            raise Unsupported("ScatterElements other than 1-D with reduction='add'")
        size = self.shape(a[0])[0]
        indices = tf.cast(tf.reshape(a[1], [-1]), tf.int32)
        summed = tf.math.unsorted_segment_sum(tf.reshape(a[2], [-1]), indices, num_segments=size)
        return tf.convert_to_tensor(a[0]) + summed

    # -- reductions, top-N ------------------------------------------------------------------------------------
    def op_ReduceSum(self, a: list[Any], k: dict[str, Any]) -> Any:
        axes = self.axes(a, k)
        if not axes and int(k.get("noop_with_empty_axes", 0)):
            return a[0]
        return _tf().math.reduce_sum(a[0], axis=axes or None, keepdims=bool(int(k.get("keepdims", 1))))

    def op_ArgMax(self, a: list[Any], k: dict[str, Any]) -> Any:
        tf = _tf()
        if int(k.get("select_last_index", 0)):
            raise Unsupported("ArgMax with select_last_index=1")
        rank = len(self.shape(a[0]))
        axis = int(k.get("axis", 0)) % rank
        x = a[0]
        if axis != rank - 1:  # TFLite's ARG_MAX over an inner axis is ~10x slower than a transpose + last axis
            x = tf.transpose(x, [i for i in range(rank) if i != axis] + [axis])
        out = tf.math.argmax(x, axis=-1, output_type=tf.int64)  # the first index of the maximum, as ONNX
        return tf.expand_dims(out, axis) if int(k.get("keepdims", 1)) else out

    def op_TopK(self, a: list[Any], k: dict[str, Any]) -> Any:
        tf = _tf()
        if not int(k.get("sorted", 1)) or not int(k.get("largest", 1)):
            raise Unsupported("TopK other than largest=1, sorted=1")
        count = int(self.static(a[1], "TopK K").reshape(-1)[0])
        rank = len(self.shape(a[0]))
        axis = int(k.get("axis", -1)) % rank
        perm = [i for i in range(rank) if i != axis] + [axis]
        x = a[0] if axis == rank - 1 else tf.transpose(a[0], perm)
        values, indices = tf.math.top_k(x, k=count, sorted=True)
        indices = tf.cast(indices, tf.int64)
        if axis != rank - 1:
            inverse = list(np.argsort(perm))
            values, indices = tf.transpose(values, inverse), tf.transpose(indices, inverse)
        return values, indices

    # -- linear algebra, pooling, resizing -------------------------------------------------------------------
    def op_Gemm(self, a: list[Any], k: dict[str, Any]) -> Any:
        tf = _tf()
        out = tf.linalg.matmul(a[0], a[1], transpose_a=bool(k.get("transA", 0)), transpose_b=bool(k.get("transB", 0)))
        out = out * float(k.get("alpha", 1.0))
        return out + float(k.get("beta", 1.0)) * a[2] if len(a) > 2 and a[2] is not None else out

    def op_LayerNormalization(self, a: list[Any], k: dict[str, Any]) -> Any:
        tf = _tf()
        rank = len(self.shape(a[0]))
        axes = list(range(int(k.get("axis", -1)) % rank, rank))
        centered = a[0] - tf.math.reduce_mean(a[0], axis=axes, keepdims=True)
        variance = tf.math.reduce_mean(centered * centered, axis=axes, keepdims=True)
        out = centered * tf.math.rsqrt(variance + float(k.get("epsilon", 1e-5))) * a[1]
        return out + a[2] if len(a) > 2 and a[2] is not None else out

    def op_MaxPool(self, a: list[Any], k: dict[str, Any]) -> Any:
        """2D max pool whose explicit pads are TF's SAME padding (the peak NMS). TF's SAME max pool ignores the
        padding, as ONNX's implicit -inf padding does, with no -inf constant (its range would wreck int8 nearby)."""
        tf = _tf()
        shape = self.shape(a[0])
        kernel = [int(v) for v in k["kernel_shape"]]
        strides = [int(v) for v in k.get("strides", [1, 1])]
        same = []
        for size, kernel_, stride in zip(shape[2:], kernel, strides, strict=True):
            total = max((-(-size // stride) - 1) * stride + kernel_ - size, 0)
            same.append((total // 2, total - total // 2))
        pads = [int(v) for v in k.get("pads", [0, 0, 0, 0])]
        if len(shape) != 4 or int(k.get("ceil_mode", 0)) or text(k.get("auto_pad", "NOTSET")) != "NOTSET" \
                or any(int(d) != 1 for d in k.get("dilations", [1, 1])) \
                or pads != [same[0][0], same[1][0], same[0][1], same[1][1]]:  # fmt: skip
            raise Unsupported(f"MaxPool other than 2D with SAME-like pads (kernel {kernel}, pads {pads})")
        x = tf.nn.max_pool2d(tf.transpose(a[0], [0, 2, 3, 1]), ksize=kernel, strides=strides, padding="SAME")
        return tf.transpose(x, [0, 3, 1, 2])

    def op_Resize(self, a: list[Any], k: dict[str, Any]) -> Any:
        tf = _tf()
        shape = self.shape(a[0])
        mode = text(k.get("mode", "nearest"))
        transform = text(k.get("coordinate_transformation_mode", "half_pixel"))
        sizes = self.static(a[3], "Resize sizes") if len(a) > 3 and a[3] is not None else np.zeros(0)
        if sizes.size:
            target = [int(v) for v in sizes]
        else:
            scales = [float(v) for v in self.static(a[2], "Resize scales")]
            target = [int(np.floor(d * s)) for d, s in zip(shape, scales, strict=True)]
        nhwc = len(shape) == 4 and target[0] == shape[0] and target[3] == shape[3] and target[1:3] != shape[1:3]
        if len(shape) != 4 or (target[:2] != shape[:2] and not nhwc):
            raise Unsupported("Resize other than the spatial dims of a 4D NCHW or NHWC tensor")
        spatial = target[1:3] if nhwc else target[2:]
        if mode != "linear" or transform not in ("half_pixel", "pytorch_half_pixel") or min(spatial) <= 1:
            raise Unsupported(f"Resize mode={mode} coordinate_transformation_mode={transform}")
        if nhwc:  # the merge's channel-last Resize: TFLite's own layout, no transposes
            return tf.compat.v1.image.resize_bilinear(a[0], spatial, align_corners=False, half_pixel_centers=True)
        x = tf.transpose(a[0], [0, 2, 3, 1])  # measured: 10x faster than resizing [B*C, h, w, 1] without transposes
        x = tf.compat.v1.image.resize_bilinear(x, spatial, align_corners=False, half_pixel_centers=True)
        return tf.transpose(x, [0, 3, 1, 2])
