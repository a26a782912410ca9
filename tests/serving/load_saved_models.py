"""Loads SavedModels the ways a server does, in a process without kerasbn.

Usage: python load_saved_models.py OUTPUT.npz ROOT [ROOT ...]

Each ROOT holds `1/` (a SavedModel) and `inputs/<name>.npy` (one array per
input of its `serving_default` signature). For each ROOT the signature is run
twice:
  - `tf2`: `tf.saved_model.load(ROOT/1).signatures["serving_default"](**inputs)`;
  - `session`: what TF Serving does, the TF1 loader
    `tf.compat.v1.saved_model.loader.load(sess, ["serve"], ROOT/1)`, then
    `sess.run` of the signature's output tensor names fed by its input tensor
    names.
OUTPUT gets `"<root basename>/<method>/<output name>"` arrays.

The process first checks that `import kerasbn` fails: the models must load with
stock TensorFlow alone.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def assert_kerasbn_unavailable():
    try:
        import kerasbn  # noqa: F401
    except ImportError:
        return
    raise AssertionError("kerasbn is importable in the loader process")


def read_inputs(root):
    import numpy as np

    directory = os.path.join(root, "inputs")
    return {
        name[: -len(".npy")]: np.load(os.path.join(directory, name))
        for name in sorted(os.listdir(directory))
        if name.endswith(".npy")
    }


def run_tf2(saved_model, inputs):
    import tensorflow as tf

    signature = tf.saved_model.load(saved_model).signatures["serving_default"]
    outputs = signature(**{name: tf.constant(value) for name, value in inputs.items()})
    return {name: tensor.numpy() for name, tensor in outputs.items()}


def run_session(saved_model, inputs):
    import tensorflow as tf

    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], saved_model)
        signature = meta_graph.signature_def["serving_default"]
        feed = {signature.inputs[name].name: value for name, value in inputs.items()}
        fetch = {name: info.name for name, info in signature.outputs.items()}
        return session.run(fetch, feed_dict=feed)


def main(output_path, roots):
    assert_kerasbn_unavailable()
    import numpy as np

    results = {}
    for root in roots:
        inputs = read_inputs(root)
        saved_model = os.path.join(root, "1")
        label = os.path.basename(os.path.normpath(root))
        for method, run in (("tf2", run_tf2), ("session", run_session)):
            for name, value in run(saved_model, inputs).items():
                results[f"{label}/{method}/{name}"] = value
    assert_kerasbn_unavailable()
    assert "kerasbn" not in sys.modules or sys.modules["kerasbn"] is None
    np.savez(output_path, **results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
