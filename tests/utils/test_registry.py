"""d2engine.utils.registry.Registry."""

from __future__ import annotations

import pytest

from d2engine.utils.registry import Registry


def test_register_as_decorator_and_direct_call() -> None:
    reg = Registry("THING")

    @reg.register()
    class Foo:
        pass

    def bar() -> int:
        return 1

    assert reg.register(bar) is bar  # the direct call returns the object
    assert reg.register(bar, name="baz") is bar

    @reg.register(name="named")
    def qux() -> int:
        return 2

    assert reg.get("Foo") is Foo
    assert reg.get("bar") is bar
    assert reg.get("baz") is bar
    assert reg.get("named") is qux
    assert "Foo" in reg and "nope" not in reg
    assert len(reg) == 4
    assert dict(iter(reg)) == {"Foo": Foo, "bar": bar, "baz": bar, "named": qux}
    assert reg.name == "THING"
    assert "Foo" in repr(reg)


def test_duplicate_name_is_an_error() -> None:
    reg = Registry("THING")
    reg.register(len)
    with pytest.raises(ValueError, match=r"'len' is already registered in the 'THING' registry"):
        reg.register(len)
    with pytest.raises(ValueError, match="already registered"):
        reg.register(max, name="len")


def test_unknown_name_lists_registered_and_close_matches() -> None:
    reg = Registry("META_ARCH")

    @reg.register()
    class Classifier:
        pass

    with pytest.raises(KeyError, match=r"No object named 'Clasifier'.*Did you mean 'Classifier'"):
        reg.get("Clasifier")
    with pytest.raises(KeyError, match=r"Registered: \['Classifier'\]"):
        reg.get("Unrelated")
    with pytest.raises(KeyError, match="nothing yet"):
        Registry("EMPTY").get("x")


def test_object_without_name_needs_explicit_name() -> None:
    reg = Registry("THING")
    with pytest.raises(TypeError, match=r"no __name__.*register\(obj, name=\.\.\.\)"):
        reg.register(3)
    reg.register(3, name="three")
    assert reg.get("three") == 3
    with pytest.raises(TypeError, match="non-empty string"):
        reg.register(4, name="")
