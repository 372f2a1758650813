"""The multipart bodies of OpenAI's ``/v1/images/edits`` and ``/v1/images/variations``, read with the
same care as JSON: every part checked before anything is decoded.

The official client sends files as file parts (``image``, or ``image[]`` for a list; ``mask``) and
every other field, its own and this service's extra ones (``extra_body``), as text parts, numbers
and booleans as their strings (``"seed": "3"``, ``"stream": "true"``). Here a text part is
converted to its field's type (int, float, bool) and then validated by the same pydantic model as a
JSON body would be, so its errors read the same (OpenAI's 400 naming the parameter). Refused with
400: a body that is not multipart or cannot be parsed, a repeated part, a file where text belongs and
text where a file belongs, a part this endpoint does not know, more than one image. The bytes of
each file are bounded by the service's ``max_image_bytes`` (413); decoding is left to
:mod:`service.images`, off the event loop.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

from fastapi import HTTPException, Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from service.api.middleware import BodyTooLarge
from service.images import TooLarge

FILES = ("image", "mask")
MAX_PARTS = 64


def invalid(param: str | None, message: str, code: str = "invalid_value") -> HTTPException:
    return HTTPException(400, {"message": message, "param": param, "code": code})


@dataclass
class Form:
    fields: dict  # text parts, converted to their field's type where the model says so
    files: dict[str, bytes]  # file parts by field ("image[]" read as "image")


def _convert(value: str, annotation) -> object:
    """A text part as the type its field wants (left as text when that fails: validation says why)."""
    kinds = set(typing.get_args(annotation)) or {annotation}
    v = value.strip()
    if bool in kinds and v.lower() in ("true", "false"):
        return v.lower() == "true"
    if int in kinds:
        try:
            return int(v)
        except ValueError:
            pass
    if float in kinds:
        try:
            return float(v)
        except ValueError:
            pass
    return value


async def read(request: Request, model: type[BaseModel], files: tuple[str, ...], max_bytes: int) -> Form:
    """The form's parts: text parts converted for ``model``'s fields, file parts' bytes (see the module)."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise invalid(None, "This endpoint takes multipart/form-data (the image as a file part).",
                      "invalid_content_type")
    try:
        form = await request.form(max_files=len(files) + 2, max_fields=MAX_PARTS)
    except BodyTooLarge:
        raise
    except Exception as e:  # starlette's MultiPartException (as an HTTPException) and the parser's own errors
        reason = getattr(e, "detail", None) or getattr(e, "message", None) or e
        raise invalid(None, f"Could not parse the multipart body: {reason}.", "invalid_multipart") from None
    seen: dict[str, int] = {}
    text: dict = {}
    blobs: dict[str, bytes] = {}
    annotations = {name: f.annotation for name, f in model.model_fields.items()}
    for key, value in form.multi_items():
        name = key[:-2] if key == "image[]" else key
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            raise invalid(name, f"'{name}' was given more than once" + (
                "; this service edits one image per request" if name == "image" else "") + ".", "duplicate_parameter")
        is_file = isinstance(value, UploadFile)
        if name in files:
            if not is_file:
                raise invalid(name, f"'{name}' must be a file part (an image), not text.")
            if value.size is not None and value.size > max_bytes:
                raise TooLarge(name, value.size, max_bytes)
            data = await value.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise TooLarge(name, len(data), max_bytes)
            blobs[name] = data
        elif name not in annotations:
            raise invalid(name, f"Unknown parameter: '{name}'.", "unknown_parameter")
        elif is_file:
            raise invalid(name, f"'{name}' must be a text field, not a file.")
        else:
            text[name] = _convert(value, annotations[name])
    await form.close()
    return Form(text, blobs)


def validate(model: type[BaseModel], form: Form) -> BaseModel:
    """The form's text fields as ``model`` (its ValidationError becomes OpenAI's 400 naming the field)."""
    try:
        return model.model_validate(form.fields)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err.get("loc", ())) or None
        if err.get("type") == "missing":
            raise invalid(field, f"Missing required parameter: '{field}'.", "missing_required_parameter") from None
        if err.get("type") == "extra_forbidden":
            raise invalid(field, f"Unknown parameter: '{field}'.", "unknown_parameter") from None
        raise invalid(field, f"Invalid value for '{field}': {err.get('msg', 'invalid')}.") from None
