"""In-process fakes of outside services (WeChat Pay, mini-program API) for tests."""
