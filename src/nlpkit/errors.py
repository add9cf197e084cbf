"""Errors a user can fix. The CLI prints them as one line and exits 2; anything else is a bug (exit 1). And how a
schema's errors read: `dotted.key: problem (got X); did you mean Y?`."""

import difflib
import typing


class NlpkitError(Exception):
    """Bad input: config, data, paths or arguments. The message names the key, file or row and the fix."""

    exit_code = 2


class TrainingStopped(NlpkitError):
    """The watchdog stopped a run (NaN/inf gradients, a loss stuck at 0): exit 3, the last good checkpoint kept."""

    exit_code = 3


def describe_validation(error, root) -> list[str]:
    """A pydantic ValidationError of the model `root` as one line per problem, unknown keys with a did-you-mean."""
    lines = []
    for err in error.errors():
        loc = [str(part) for part in err["loc"]]
        key = ".".join(loc)
        if err["type"] == "extra_forbidden":
            known = _fields_at(root, loc[:-1])
            lines.append(f"{key}: unknown key{did_you_mean(loc[-1], known)}")
        elif err["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            lines.append(f"{key}: {err['msg'][0].lower()}{err['msg'][1:]} (got {err['input']!r})")
    return lines


def _fields_at(model, loc: list[str]) -> list[str]:
    from pydantic import BaseModel

    for part in loc:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        # An optional section (`PPOSection | None`) names its fields like a required one.
        annotation = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def did_you_mean(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
