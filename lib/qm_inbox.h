/*
 * qm_inbox: idempotent consumption. A consumer applies an event and records
 * its id in the inbox table in one transaction; an event id seen before (a
 * redelivery after a crash, a producer retry, a relay that published twice)
 * is recognised and skipped, while its offset is still stored. This is what
 * makes retrying an ambiguous COMMIT safe (see qm_pg_commit()).
 *
 * The inbox table comes with the outbox in migration 1 (QM_OUTBOX_MIGRATION
 * in qm_outbox.h): inbox(event_id text primary key, topic, received_at).
 */
#ifndef QM_INBOX_H
#define QM_INBOX_H

#include "qm_pg.h"

#include <stddef.h>
#include <stdint.h>

/* Claims event_id inside the caller's open transaction on c (INSERT ... ON
 * CONFLICT DO NOTHING). QM_OK: new, apply the event in this transaction.
 * QM_EDUP: already applied, skip it (and still store the offset). A second
 * transaction claiming the same id waits for the first: if that commits it
 * gets QM_EDUP, if it rolls back the claim is its own. topic may be NULL.
 * Other errors are those of qm_pg_exec(). */
int qm_inbox_claim(qm_pg_t *c, const char *event_id, const char *topic, char *errstr,
                   size_t errstr_size);

/* Deletes up to limit inbox rows received more than older_than_ms ago; keep
 * them longer than any redelivery can take (the topic's retention). Returns
 * the number deleted (>= 0) or a negative QM_E* code. */
int qm_inbox_purge(qm_pg_t *c, int64_t older_than_ms, int limit);

#endif /* QM_INBOX_H */
