"""mmkv's operator kernels (PyTorch reference and Triton), installed as ``mmkv_compile.kernels``.

In a checkout, this folder is also visible as a top-level ``kernels`` whenever the repository root is on
``sys.path`` (``python -m pytest``, ``python -c`` run there). That name belongs to Hugging Face's ``kernels``
package, which transformers 5.25 imports at start-up: imported under that name, this file hands over to the
package of that name found elsewhere on ``sys.path``. Where there is none, it stays an empty module with no
version, which transformers (which imports it to read a version) reads as "not installed".
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        # the import statement that ran this file returns whatever sys.modules holds under the name when it ends
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
