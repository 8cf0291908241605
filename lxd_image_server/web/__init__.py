"""The upload app (run by gunicorn as the uploader): writes image files, never streams/."""
