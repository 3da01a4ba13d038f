"""Coverage-guided fuzzing of every inbound decoder with atheris (issue 10, part 8).

The same decoders and the same checks as the Hypothesis tests in
test_fuzz.py: each input gets a documented error or a valid result that the
core can apply. The first byte picks the decoder:
  0 a WebSocket command (text frame: JSON)     1 the same as a binary frame (msgpack)
  2 a Kafka record value (JSON)                5 the same in msgpack
  3 an HTTP ingest body (JSON array or NDJSON) 4 a query string's last_event

make test runs it for a few thousand inputs (test_fuzz.py); docs/fuzzing.md
says how to run it for hours with a kept corpus:
    .venv/bin/python tests/fuzz_atheris.py -max_total_time=14400 fuzz-corpus/
A failing input is written to crash-<hash>; replay it with the same command
and the file's path instead of the corpus.
"""
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).parent))

with atheris.instrument_imports(include=["realtime"]):
    import realtime.ingest.decode  # noqa: F401
    import realtime.messages  # noqa: F401
    import realtime.replay  # noqa: F401
    from test_fuzz import check_command, check_http_body, check_kafka_value, check_last_event


def one_input(data: bytes) -> None:
    if not data:
        return
    which, rest = data[0] % 6, data[1:]
    if which == 0:
        check_command(rest, False)
    elif which == 1:
        check_command(rest, True)
    elif which == 2:
        check_kafka_value(rest, False)
    elif which == 5:
        check_kafka_value(rest, True)
    elif which == 3:
        check_http_body(rest)
    else:
        check_last_event(rest.decode("utf-8", "replace"))


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
