-- Repeated status reports are recognised by the status lattice alone (a status once seen left its
-- message at that rank or above), so nothing looks reports up by provider id any more: the table is an
-- append-only audit trail, and its index cost every report an insert.
DROP INDEX status_reports_dedupe;
