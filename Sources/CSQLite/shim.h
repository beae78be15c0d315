// SQLite, used only by `agentd-bench` as the baseline the journal is compared with.
#include <sqlite3.h>
