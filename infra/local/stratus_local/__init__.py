"""Local mode: the template's resources on moto (or any endpoint), functions invoked in-process."""
