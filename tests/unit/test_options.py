import pytest
from IPython.core.error import UsageError

from jupyter_gpu.kernelext.options import parse_cell_options


def test_defaults_use_the_pool_default_fraction():
    opts = parse_cell_options("")
    assert opts.spec.fraction == 0.25 and opts.spec.workers == 1 and not opts.explicit_request


@pytest.mark.parametrize("text,field,value", [
    ("--gpus 0.5", "fraction", 0.5),
    ("--gpus 1", "gpus", 1),
    ("--gpus 1.0", "fraction", 1.0),
    ("--gpus 2", "gpus", 2),
    ("--memory 8GiB", "memory", 8 * 2**30),
    ("--memory 500MB", "memory", 500 * 10**6),
])
def test_requests(text, field, value):
    assert getattr(parse_cell_options(text).spec, field) == value


def test_all_options():
    opts = parse_cell_options("--gpus 0.5 --timeout 5min --priority batch --in a,b --out x --fresh --async "
                              "--name 'my run'")
    assert opts.timeout == 300 and opts.spec.priority == "batch"
    assert opts.inputs == ["a", "b"] and opts.outputs == ["x"] and opts.fresh and opts.run_async
    assert opts.name == "my run"


@pytest.mark.parametrize("text,needle", [
    ("--gpus 0", "greater than 0"),
    ("--gpus -1", "greater than 0"),
    ("--gpus abc", "fraction of one GPU"),
    ("--gpus 1.5", "must be whole"),
    ("--memory 12 apples", "unrecognized arguments"),
    ("--memory lots", "memory size"),
    ("--gpus 0.5 --memory 1GiB", "not both"),
    ("--workers 0", "whole number"),
    ("--timeout -3", "positive duration"),
    ("--priority urgent", "interactive"),
    ("--in 1x", "not a variable name"),
    ("--frobnicate", "unrecognized arguments: --frobnicate"),
    ("--gpus 2 --workers 2", "one rank per GPU"),
    ("'unclosed", "quotes"),
])
def test_bad_options_are_one_clear_usage_error(text, needle):
    with pytest.raises(UsageError) as info:
        parse_cell_options(text)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message  # one paragraph
