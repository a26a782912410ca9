"""What a traced serving graph contains, read from its `GraphDef`."""

XLA_MUST_COMPILE = "_XlaMustCompile"


def _must_compile(attrs):
    # tf.function(jit_compile=False) writes `_XlaMustCompile: false`; only True counts.
    return XLA_MUST_COMPILE in attrs and attrs[XLA_MUST_COMPILE].b


def xla_compiled_nodes(graph_def):
    """Names of the call nodes and functions of `graph_def` marked `_XlaMustCompile`.

    Walks the graph's nodes and every function of its library, so functions
    nested at any depth are seen.
    """
    functions = graph_def.library.function
    names = [f.signature.name for f in functions if _must_compile(f.attr)]
    node_defs = list(graph_def.node) + [n for f in functions for n in f.node_def]
    names += [n.name for n in node_defs if _must_compile(n.attr)]
    return names
