"""The HTTP side: the registry API, the pages people read, access control and hosting."""
