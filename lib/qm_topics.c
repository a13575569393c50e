/* qm_topics: the list of topics (names in qm_topics.h). */
#include "qm_topics.h"

const char *const qm_topics_all[] = {QM_TOPIC_HR,     QM_TOPIC_REQUESTS,    QM_TOPIC_DECISIONS,
                                     QM_TOPIC_ACCESS, QM_TOPIC_FULFILLMENT, QM_TOPIC_AUDIT};
const size_t qm_topics_count = sizeof(qm_topics_all) / sizeof(qm_topics_all[0]);
