"""Whether ingredients can be souped: compatibility, the doctor, estimates."""
