"""Changing what `keras.layers.BatchNormalization(...)` and `keras.layers.GroupNormalization(...)` create.

KerasHub models create their layers in their own Python code, by calling
`keras.layers.BatchNormalization(...)` (through `from keras import layers`,
the same module). To build such a model with other layers, the two names in
`keras.layers` are replaced by proxies while a scope is active. A proxy asks
the scope of the calling thread (a `contextvars.ContextVar`, so each thread
and each asyncio task has its own) for a factory; without one it creates
Keras' own layer, so threads outside any scope are unaffected. The proxies
behave as the classes they stand for in `isinstance`, `issubclass`, attribute
access and as a base class. They are put in place when the first scope of
the process is entered and removed when the last one exits, under a lock.
"""

import contextlib
import contextvars
import threading

import keras

NAMES = ("BatchNormalization", "GroupNormalization")

# The factory of the calling context: `factory(keras_class, args, kwargs) -> layer`,
# or None for Keras' own layers.
_FACTORY = contextvars.ContextVar("kerasbn_normalization_factory", default=None)
_LOCK = threading.Lock()
_state = {"scopes": 0, "originals": {}}


class _Proxy:
    """Stands for one of Keras' normalization classes in `keras.layers` while scopes are active."""

    def __init__(self, keras_class):
        self._keras_class = keras_class

    def __call__(self, *args, **kwargs):
        factory = _FACTORY.get()
        if factory is None:
            return self._keras_class(*args, **kwargs)
        return factory(self._keras_class, args, kwargs)

    def __instancecheck__(self, instance):
        return isinstance(instance, self._keras_class)

    def __subclasscheck__(self, subclass):
        return issubclass(subclass, self._keras_class)

    def __mro_entries__(self, bases):
        # `class MyNorm(keras.layers.BatchNormalization)` subclasses Keras' class.
        return (self._keras_class,)

    def __getattr__(self, name):
        return getattr(self._keras_class, name)

    def __repr__(self):
        return repr(self._keras_class)


@contextlib.contextmanager
def creating_with(factory):
    """Within the block, in this context, Keras' normalization layers are created by `factory`.

    Args:
      factory: callable `(keras_class, args, kwargs) -> layer`, called instead
        of `keras_class(*args, **kwargs)` for `keras.layers.BatchNormalization`
        and `keras.layers.GroupNormalization`; None for Keras' own layers (e.g.
        to rebuild a model with Keras' layers inside a user's scope).
    """
    if factory is not None:
        _enter()
    token = _FACTORY.set(factory)
    try:
        yield
    finally:
        _FACTORY.reset(token)
        if factory is not None:
            _exit()


def _enter():
    with _LOCK:
        if _state["scopes"] == 0:
            for name in NAMES:
                original = getattr(keras.layers, name)
                _state["originals"][name] = original
                setattr(keras.layers, name, _Proxy(original))
        _state["scopes"] += 1


def _exit():
    with _LOCK:
        _state["scopes"] -= 1
        if _state["scopes"] == 0:
            for name, original in _state["originals"].items():
                # Only our proxy is taken out: a name someone else set since is theirs.
                if isinstance(vars(keras.layers).get(name), _Proxy):
                    setattr(keras.layers, name, original)
            _state["originals"].clear()
