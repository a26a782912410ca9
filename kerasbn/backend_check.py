"""Refuses to run on a Keras backend other than TensorFlow."""

import os


def require_tensorflow_backend():
    """Raises ImportError unless Keras uses (or will use) the TensorFlow backend."""
    requested = os.environ.get("KERAS_BACKEND")
    if requested is not None and requested != "tensorflow":
        raise ImportError(_message(requested))
    import keras

    active = keras.backend.backend()
    if active != "tensorflow":
        raise ImportError(_message(active))


def _message(backend):
    return (
        f"kerasbn needs the TensorFlow backend of Keras, but Keras is using "
        f"'{backend}'. Set the environment variable before Python starts, e.g. "
        "`export KERAS_BACKEND=tensorflow`, or in Python before importing keras: "
        "`os.environ['KERAS_BACKEND'] = 'tensorflow'`."
    )
