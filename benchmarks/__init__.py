"""Side-by-side benchmarks of kerasbn's layers against Keras and tf_keras.

Run `make bench` (or `python -m benchmarks.run`); `--quick` is a tiny smoke run.
"""
