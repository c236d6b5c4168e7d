import pytest
from IPython.core.error import UsageError

from jupyter_gpu.kernelext.options import parse_cell_options


def test_defaults_use_the_pool_default_fraction():
    opts = parse_cell_options("")
    assert opts.spec.fraction == 0.25 and opts.spec.workers == 1 and not opts.explicit_request


@pytest.mark.parametrize(
    "text,field,value",
    [
        ("--gpus 0.5", "fraction", 0.5),
        ("--gpus 1", "gpus", 1),
        ("--gpus 1.0", "fraction", 1.0),
        ("--gpus 2", "gpus", 2),
        ("--memory 8GiB", "memory", 8 * 2**30),
        ("--memory 500MB", "memory", 500 * 10**6),
        ("--host-memory 16GiB", "host_memory", 16 * 2**30),
        ("--cpus 2", "cpus", 2.0),
        ("--cpus 0.5 --gpus 0.25", "cpus", 0.5),
        ("", "host_memory", None),  # the pool's default share: decided where the lease is placed
        ("", "cpus", None),
    ],
)
def test_requests(text, field, value):
    assert getattr(parse_cell_options(text).spec, field) == value


def test_all_options():
    opts = parse_cell_options(
        "--gpus 0.5 --timeout 5min --priority batch --in a,b --out x --fresh --async "
        "--name 'my run'"
    )
    assert opts.timeout == 300 and opts.spec.priority == "batch"
    assert opts.inputs == ["a", "b"] and opts.outputs == ["x"] and opts.fresh and opts.run_async
    assert opts.name == "my run"


@pytest.mark.parametrize(
    "text,needle",
    [
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
        ("--host-memory lots", "--host-memory lots"),
        ("--host-memory 0", "greater than zero"),
        ("--cpus 0", "CPU cores above 0"),
        ("--cpus nan", "CPU cores above 0"),
        ("--cpus 1e400", "CPU cores above 0"),
    ],
)
def test_bad_options_are_one_clear_usage_error(text, needle):
    with pytest.raises(UsageError) as info:
        parse_cell_options(text)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message  # one paragraph


def test_retries_and_no_abbreviations():
    assert parse_cell_options("--retries 0").retries == 0 and parse_cell_options("").retries == 2
    with pytest.raises(UsageError, match="whole number >= 0"):
        parse_cell_options("--retries many")
    with pytest.raises(UsageError, match="unrecognized arguments: --gpu"):  # not silently --gpus
        parse_cell_options("--gpu 0.5")


def test_usage_help_and_the_tables_come_from_the_one_declaration():
    """Every option the parser takes is in the usage line of every error, in ``%gpu?`` / ``%gpu
    help`` and in the generated tables, with its help text (``--retries`` was parsed but documented
    nowhere)."""
    from jupyter_gpu.kernelext import options
    from jupyter_gpu.kernelext.magics import GpuMagics

    flags = [a.option_strings[0] for a in options._parser()._actions]
    assert flags == [
        "--gpus",
        "--memory",
        "--host-memory",
        "--cpus",
        "--workers",
        "--timeout",
        "--priority",
        "--in",
        "--out",
        "--fresh",
        "--async",
        "--name",
        "--resume",
        "--retries",
    ]
    help_text, table = options.options_help(), options.options_markdown()
    for flag in flags:
        assert f"[{flag}" in options.USAGE and flag in help_text and f"| `{flag}" in table
    assert "\n" not in options.USAGE and options.USAGE.startswith(
        "%%gpu [--gpus F] [--memory SIZE]"
    )
    assert "preempted cell is requeued" in table and "resumes from its last checkpoint" in table
    # --resume: resuming is asked for, never silent
    assert "without it every run starts afresh" in table
    assert GpuMagics.gpu.__doc__.startswith(help_text) and "%gpu release" in GpuMagics.gpu.__doc__


@pytest.mark.parametrize("name", ["README.md", "docs/user-guide.md"])
def test_the_docs_options_table_is_the_generated_one(name):
    """Fails when an option's declaration changed and the docs were not regenerated: run
    ``python -m jupyter_gpu.kernelext.options`` from the repository root."""
    from pathlib import Path

    from jupyter_gpu.kernelext import options

    text = (Path(__file__).resolve().parents[2] / name).read_text()
    assert options.BEGIN_MARK in text and options.END_MARK in text
    assert options.with_generated_table(text) == text, (
        f"{name}'s %%gpu options table differs from the declaration: run python -m "
        "jupyter_gpu.kernelext.options"
    )


def test_each_option_converts_through_its_own_type():
    """The checks live in each option's ``type=`` (``option_values.py``), not in one long
    function: every option that takes a value has one, and the parsed values are the converted
    ones."""
    from jupyter_gpu.kernelext import option_values, options

    for action in options._parser()._actions:
        if action.nargs != 0:  # flags (--fresh, --async, --resume) take no value
            assert callable(action.type) and action.type.__module__ == option_values.__name__, (
                action.option_strings
            )
    opts = parse_cell_options("--gpus 1 --workers 3 --retries 0 --timeout 2h --in a --name x")
    assert (opts.spec.gpus, opts.spec.fraction, opts.spec.workers) == (1, None, 3)
    assert (opts.retries, opts.timeout, opts.inputs, opts.name) == (0, 7200.0, ["a"], "x")


@pytest.mark.parametrize(
    "line,parsed",
    [
        ("connect", ("connect", {"address": None, "keep": False})),
        (
            "connect tcp://10.0.0.5:8786 --keep",
            ("connect", {"address": "tcp://10.0.0.5:8786", "keep": True}),
        ),
        ("scale 3", ("scale", {"n": 3})),
        ("pull model", ("pull", {"name": "model"})),
        ("cancel R12", ("cancel", {"id": "R12"})),
        ("status", ("status", {})),
        ("", ("help", {})),
    ],
)
def test_line_commands_parse_through_their_declarations(line, parsed):
    from jupyter_gpu.kernelext.line_commands import parse_line

    command, args = parse_line(line)
    assert (command, vars(args)) == parsed


@pytest.mark.parametrize(
    "line,needle",
    [
        ("scale", "the following arguments are required: N. Usage: `%gpu scale N`"),
        ("scale x", "%gpu scale x: write a whole number >= 0"),
        ("connect a b", "unrecognized arguments: b. Usage: `%gpu connect [--keep] [ADDRESS]`"),
        ("connect --kee", "unrecognized arguments: --kee"),  # not silently --keep
        ("status now", "unrecognized arguments: now. Usage: `%gpu status`"),
        ("pull 1x", "give the name of one variable"),
        ("cancel", "required: ID"),
        ("bogus", "unknown command"),
        ("pull 'x", "check the quotes"),
    ],
)
def test_a_wrong_line_command_names_the_mistake_and_the_commands_usage(line, needle):
    from jupyter_gpu.kernelext.line_commands import parse_line

    with pytest.raises(UsageError) as info:
        parse_line(line)
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_the_line_commands_help_is_generated_from_their_declarations():
    """``%gpu help`` and ``%gpu?`` list every command with its usage and every argument with its
    help, from the same declarations the commands are parsed with (the help was a hand-written
    string beside a ``str.split()`` parser)."""
    from jupyter_gpu.kernelext import line_commands
    from jupyter_gpu.kernelext.magics import GpuMagics

    text = line_commands.LINE_HELP
    for command in line_commands.COMMANDS:
        usage = line_commands.command_usage(command)
        assert usage.startswith(f"%gpu {command}") and usage in text
        assert line_commands.description(command) in text
        for action in line_commands._parser(command)._actions:
            assert action.help and action.help in text, (command, action.dest)
    assert "%gpu scale N" in text and "%gpu connect [--keep] [ADDRESS]" in text
    assert text in GpuMagics.gpu.__doc__


def test_the_option_and_view_functions_are_short():
    """No function of the option parsing or the status views is over 100 lines (``parse_cell_options``
    was 107, ``StatusView._parts`` 127)."""
    import ast
    from pathlib import Path

    from jupyter_gpu.kernelext import line_commands, option_values, options, status_view

    for module in (options, option_values, line_commands, status_view):
        tree = ast.parse(Path(module.__file__).read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 100, f"{module.__name__}.{node.name} is {length} lines"


def test_a_session_is_kept_only_when_its_lease_booked_the_host_memory_and_cores_asked_for():
    from jupyter_gpu.kernelext.session_choice import fits_lease

    lease = {"fraction": 0.25, "bytes": 4 * 2**30, "gpu_indices": [0], "host_memory": 2**30}
    lease["cpus"] = 0.5
    for line, fits in [
        ("--host-memory 1GiB --cpus 0.5", True),
        ("--host-memory 2GiB", False),
        ("--cpus 1", False),
        ("--gpus 0.25", True),
    ]:
        opts = parse_cell_options(line)
        assert opts.explicit_request and fits_lease(opts.spec, lease) is fits, line


def test_the_badge_says_what_the_lease_booked_on_its_machine():
    from jupyter_gpu.kernelext.badge import host_share

    assert host_share({"host_memory": 3 * 2**30, "cpus": 1}) == (
        " with 3.0 GiB host memory and 1 CPU core"
    )
    assert host_share({"host_memory": 2**29, "cpus": 0.187}) == (
        " with 512.0 MiB host memory and 0.187 CPU cores"
    )
    assert host_share({"host_memory": 0, "cpus": 0}) == ""  # a machine that reports no bound
