"""Teacher clients behind one interface (``base.Teacher``): the OpenAI-compatible HTTP client for real teachers
and the reference teacher, the offline stand-in for a frontier model that the local stack serves over the same
HTTP API. See docs/teacher.md."""

from services.teacher.base import Completion, Teacher, TeacherError, teacher_from_settings

__all__ = ["Completion", "Teacher", "TeacherError", "teacher_from_settings"]
