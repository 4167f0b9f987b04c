"""Images in: decoding (JPEG header, EXIF orientation, libjpeg-turbo / Pillow), the model transform, box crops."""
