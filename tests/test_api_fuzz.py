"""A property-based fuzz of the whole HTTP API from its own OpenAPI schema (schemathesis): whatever the
input, no 5xx and no response that contradicts the schema. Bounded examples per operation (CI-sized)."""

import shutil

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from server.config import Settings
from tests.server_harness import RunningServer

EXAMPLES = 25


@pytest.fixture(scope="module")
def fuzz_server(llama_dir, llama_adapters, tmp_path_factory):
    store = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(llama_adapters("fuzz_a", seed=901, r=4, lora_alpha=8), store / "fuzz-a")
    settings_ = Settings(model=llama_dir, adapters_dir=store, dtype="float32", device="cpu",
                         kv_cache_memory=16 * 1024**2, served_model_name="base", max_upload_size=1024**2)
    with RunningServer(settings_) as server:
        yield server


def test_no_server_error_and_no_schema_violation(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    failures, operations = {}, 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            case.call_and_validate(checks=[not_a_server_error, response_schema_conformance], timeout=30)

        try:
            fuzz()
        except Exception as exc:  # every operation is fuzzed; all failures are reported together
            failures[operation.label] = f"{type(exc).__name__}: {exc}"[:2000]
    assert operations >= 25  # the whole API, not an empty schema
    assert not failures, "\n\n".join(f"{label}\n{text}" for label, text in failures.items())
