"""Property-based checks: malformed task files and configs fail with ValueError naming the
problem (file and line, or the bad key), never with another exception."""
import json
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polytask.core.data.task_data import load_task
from polytask.core.data.tasks import TaskSpec
from polytask.experiments.config import RunConfig

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
record = st.fixed_dictionaries({}, optional={"task": st.just("t") | json_scalars,
                                             "instruction": json_values, "input": json_values,
                                             "output": json_values, "extra": json_values})
good = st.fixed_dictionaries({"task": st.just("t"), "instruction": st.text(min_size=1, max_size=10),
                              "input": st.text(max_size=10), "output": st.sampled_from(["yes", "no"])})
line = (record.map(json.dumps) | good.map(json.dumps) | st.text(max_size=20)
        | st.just("{\"task\": \"t\",") | st.just(""))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(line, min_size=1, max_size=6), kind=st.sampled_from(["generation", "classification"]))
def test_malformed_jsonl_names_file_and_line(tmp_path, lines, kind):
    path = tmp_path / "t.train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    spec = TaskSpec(name="t", kind=kind, labels=["yes", "no"] if kind == "classification" else None,
                    files={"train": str(path)})
    try:
        examples = load_task(spec, "train")
    except ValueError as e:
        msg = str(e)
        assert str(path) in msg, msg
        # a problem on a given line names it as path:line
        if re.search(r"line|:\d+", msg) is None:
            assert "no examples" in msg or "empty" in msg, msg
        return
    assert examples and all(ex.task == "t" for ex in examples)


section_value = json_values | st.dictionaries(st.text(max_size=12), json_values, max_size=4)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["model", "tasks", "sharing", "weighting", "losses", "data",
                                        "train", "grid", "optimizer"]), section_value, max_size=4))
def test_malformed_config_is_a_value_error(data):
    try:
        RunConfig.from_dict(data)
    except ValueError as e:
        assert str(e)  # a message, naming the problem
