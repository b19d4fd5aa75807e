from zimage_server.db.models import Account, ApiKey, Base, LedgerEntry, Task
from zimage_server.db.session import Database

__all__ = ["Account", "ApiKey", "Base", "Database", "LedgerEntry", "Task"]
