"""The placeholder a kernel holds for a value that stayed in its remote GPU session.

A ``%%gpu`` cell's CUDA tensors, models and large objects stay in the session (the data contract,
``common/datacontract.py``); the kernel's name holds a ``RemoteObject`` instead. Code written for a
local value then meets the placeholder: ``plt.plot(x, y_pred.detach())``, ``y_pred + 1``,
``len(y_pred)``, ``np.asarray(y_pred)``. Each of those, and any other attribute or operation,
fails with one line that says what the name holds, where it lives and the two ways to get it here
(``%gpu pull NAME``, ``%%gpu --out NAME``): Python's own message (``'RemoteObject' object has no
attribute 'detach'``) says none of that.

Attribute lookups raise ``AttributeError`` (so ``hasattr`` and IPython's display probes still read
"no such attribute"), operations ``TypeError``; equality and hashing stay a dataclass's, so a
placeholder can be compared and kept in containers. The methods that raise are hidden from
tracebacks (``__tracebackhide__``): the user's line is the one that matters, not ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

from jupyter_gpu.common.units import format_bytes


class RemoteValueError(TypeError):
    """An operation on a value that stayed in the GPU session (the message says how to get it)."""


class RemoteAttributeError(AttributeError):
    """An attribute of a value that stayed in the GPU session (the message says how to get it)."""


def _operation(symbol: str, reflected: bool = False) -> Any:
    """A binary operator that refuses with the placeholder's hint (``y + 1``, ``1 + y``)."""

    def refuse(self: RemoteObject, other: Any) -> NoReturn:
        __tracebackhide__ = True  # the user's line is the one to show
        self._refuse(f"... {symbol} {self.name}" if reflected else f"{self.name} {symbol} ...")

    return refuse


@dataclass
class RemoteObject:
    """Stands in the kernel for a value that stayed in the remote GPU session.

    ``%gpu pull NAME`` replaces it with the real object (moved to CPU); ``%%gpu --out NAME``
    brings it back from the cell that makes it.
    """

    name: str
    type_name: str
    summary: str
    nbytes: int | None
    device: str | None
    reason: str
    lease: str | None = None

    def __repr__(self) -> str:
        return (
            f"<remote {self.type_name} '{self.name}' in your GPU session: {self.summary}; "
            f"{self.reason}. "
            f"It is used as-is by later %%gpu cells; run `%gpu pull {self.name}` to bring a CPU "
            "copy here>"
        )

    def _repr_html_(self) -> str:
        import html

        return (
            f"<div class='jupyter-gpu-remote'><b>{html.escape(self.name)}</b> stays in your GPU "
            "session "
            f"(<code>{html.escape(self.type_name)}</code>, {html.escape(self.summary)}; "
            f"{html.escape(self.reason)}). <code>%gpu pull {html.escape(self.name)}</code> brings "
            "a CPU "
            "copy here.</div>"
        )

    # ------------------------------------------------------------------ what explains itself
    def hint(self, what: str) -> str:
        """One line: ``what`` was tried on this placeholder; what it is, where it lives, how to get
        it."""
        fields = self.__dict__  # read directly: __getattr__ may run before the fields exist
        name = fields.get("name", "this value")
        facts = [f for f in (fields.get("summary"), _size(fields.get("nbytes"))) if f]
        where = (
            f"your GPU session (lease {fields['lease']})"
            if fields.get("lease")
            else ("your GPU session")
        )
        return (
            f"{what}: {name!s} is not here, it is a placeholder for a "
            f"{fields.get('type_name', 'value')}"
            + (f" ({', '.join(facts)})" if facts else "")
            + f" that stayed in {where}"
            + (f" because {fields['reason']}" if fields.get("reason") else "")
            + f". Use it in a %%gpu cell, or get a CPU copy here with `%gpu pull {name}` or by "
            f"returning it from its cell with `%%gpu --out {name}`."
        )

    def _refuse(self, what: str) -> NoReturn:
        __tracebackhide__ = True  # the user's line is the one to show
        raise RemoteValueError(self.hint(what)) from None

    def __getattr__(self, attr: str) -> Any:
        __tracebackhide__ = True  # the user's line is the one to show
        # only for attributes that do not exist: the dataclass's fields and methods never get here
        if attr.startswith("__") and attr.endswith("__"):  # pickle, copy and IPython probe these
            raise AttributeError(attr)
        raise RemoteAttributeError(self.hint(f"{self.__dict__.get('name', '')}.{attr}")) from None

    # containers and conversions
    def __len__(self) -> int:
        __tracebackhide__ = True  # the user's line is the one to show
        self._refuse(f"len({self.name})")

    def __iter__(self) -> NoReturn:
        __tracebackhide__ = True  # the user's line is the one to show
        self._refuse(f"iterating over {self.name}")

    def __contains__(self, item: Any) -> bool:
        __tracebackhide__ = True  # the user's line is the one to show
        self._refuse(f"`... in {self.name}`")

    def __getitem__(self, key: Any) -> NoReturn:
        __tracebackhide__ = True  # the user's line is the one to show
        self._refuse(f"{self.name}[...]")

    def __setitem__(self, key: Any, value: Any) -> NoReturn:
        __tracebackhide__ = True  # the user's line is the one to show
        self._refuse(f"{self.name}[...] = ...")

    def __delitem__(self, key: Any) -> NoReturn:
        __tracebackhide__ = True  # the user's line is the one to show
        self._refuse(f"del {self.name}[...]")

    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        __tracebackhide__ = True  # the user's line is the one to show
        self._refuse(f"{self.name}(...)")

    def __bool__(self) -> bool:
        __tracebackhide__ = True  # the user's line is the one to show
        self._refuse(f"bool({self.name})")

    def __float__(self) -> float:
        __tracebackhide__ = True  # the user's line is the one to show
        self._refuse(f"float({self.name})")

    def __int__(self) -> int:
        __tracebackhide__ = True  # the user's line is the one to show
        self._refuse(f"int({self.name})")

    def __index__(self) -> int:
        __tracebackhide__ = True  # the user's line is the one to show
        self._refuse(f"using {self.name} as an index")

    def __complex__(self) -> complex:
        __tracebackhide__ = True  # the user's line is the one to show
        self._refuse(f"complex({self.name})")

    def __round__(self, ndigits: int | None = None) -> NoReturn:
        __tracebackhide__ = True  # the user's line is the one to show
        self._refuse(f"round({self.name})")

    def __format__(self, spec: str) -> str:
        __tracebackhide__ = True  # the user's line is the one to show
        if not spec:
            return repr(self)
        self._refuse(f"formatting {self.name} with {spec!r}")

    # NumPy (np.asarray, ufuncs, array functions) and torch (torch.* functions) ask these
    def __array__(self, dtype: Any = None, copy: Any = None) -> NoReturn:
        __tracebackhide__ = True  # the user's line is the one to show
        self._refuse(f"converting {self.name} to a NumPy array")

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> NoReturn:
        __tracebackhide__ = True  # the user's line is the one to show
        self._refuse(f"np.{getattr(ufunc, '__name__', 'ufunc')}(... {self.name} ...)")

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> NoReturn:
        __tracebackhide__ = True  # the user's line is the one to show
        self._refuse(f"np.{getattr(func, '__name__', 'function')}(... {self.name} ...)")

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> NoReturn:
        __tracebackhide__ = True  # the user's line is the one to show
        values = [*args, *(kwargs or {}).values()]
        values += [v for a in values if isinstance(a, (list, tuple)) for v in a]  # torch.cat([y])
        mine = next((a for a in values if isinstance(a, RemoteObject)), None)
        what = f"torch {getattr(func, '__name__', 'function')}(...)"
        if mine is None:
            raise RemoteValueError(f"{what}: one of its arguments stayed in your GPU session")
        mine._refuse(f"{what} on {mine.name}")

    # arithmetic, comparisons, bit operations (both operand orders)
    __add__, __radd__ = _operation("+"), _operation("+", True)
    __sub__, __rsub__ = _operation("-"), _operation("-", True)
    __mul__, __rmul__ = _operation("*"), _operation("*", True)
    __matmul__, __rmatmul__ = _operation("@"), _operation("@", True)
    __truediv__, __rtruediv__ = _operation("/"), _operation("/", True)
    __floordiv__, __rfloordiv__ = _operation("//"), _operation("//", True)
    __mod__, __rmod__ = _operation("%"), _operation("%", True)
    __pow__, __rpow__ = _operation("**"), _operation("**", True)
    __lshift__, __rlshift__ = _operation("<<"), _operation("<<", True)
    __rshift__, __rrshift__ = _operation(">>"), _operation(">>", True)
    __and__, __rand__ = _operation("&"), _operation("&", True)
    __or__, __ror__ = _operation("|"), _operation("|", True)
    __xor__, __rxor__ = _operation("^"), _operation("^", True)
    __lt__, __le__ = _operation("<"), _operation("<=")
    __gt__, __ge__ = _operation(">"), _operation(">=")

    def __neg__(self) -> NoReturn:
        __tracebackhide__ = True  # the user's line is the one to show
        self._refuse(f"-{self.name}")

    def __pos__(self) -> NoReturn:
        __tracebackhide__ = True  # the user's line is the one to show
        self._refuse(f"+{self.name}")

    def __abs__(self) -> NoReturn:
        __tracebackhide__ = True  # the user's line is the one to show
        self._refuse(f"abs({self.name})")

    def __invert__(self) -> NoReturn:
        __tracebackhide__ = True  # the user's line is the one to show
        self._refuse(f"~{self.name}")


def _size(nbytes: int | None) -> str | None:
    return format_bytes(nbytes) if isinstance(nbytes, int) and nbytes > 0 else None
