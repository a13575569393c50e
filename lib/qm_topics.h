/*
 * qm_topics: the topic names of DESIGN.md, in one place. Every topic has a
 * dead-letter twin "<topic>.dlq" where undecodable or invalid messages go.
 */
#ifndef QM_TOPICS_H
#define QM_TOPICS_H

#include <stddef.h>

#define QM_TOPIC_HR "qm.hr.lifecycle.v1"
#define QM_TOPIC_REQUESTS "qm.requests.v1"
#define QM_TOPIC_DECISIONS "qm.decisions.v1"
#define QM_TOPIC_ACCESS "qm.access.v1"
#define QM_TOPIC_FULFILLMENT "qm.fulfillment.v1"
#define QM_TOPIC_AUDIT "qm.audit.v1"
#define QM_DLQ_SUFFIX ".dlq"

/* The six topics above, in that order, and their count. */
extern const char *const qm_topics_all[];
extern const size_t qm_topics_count;

#endif /* QM_TOPICS_H */
