/* Unit tests for audit's reading of recorded events (services/audit/
 * payload.c): decoding by topic (prefixed, dead-lettered, unknown), the
 * proto3 JSON rendering, the actor an event names, and the report facts. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "payload.h"
#include "qm_common.h"

#include "qm/v1/access.pb-c.h"
#include "qm/v1/hr.pb-c.h"
#include "qm/v1/requests.pb-c.h"

typedef struct {
  audit_fact_t f[8];
  char kinds[8][40], items[8][40], people[8][40], actors[8][40], depts[8][40], reasons[8][40];
  int n;
} facts_t;

static int collect(void *ctx, const audit_fact_t *f) {
  facts_t *fs = ctx;
  cr_assert_lt(fs->n, 8);
  fs->f[fs->n] = *f;
  qm_strlcpy(fs->kinds[fs->n], f->kind, 40);
  qm_strlcpy(fs->items[fs->n], f->item_id, 40);
  qm_strlcpy(fs->people[fs->n], f->person_id, 40);
  qm_strlcpy(fs->actors[fs->n], f->actor_id, 40);
  qm_strlcpy(fs->depts[fs->n], f->department, 40);
  qm_strlcpy(fs->reasons[fs->n], f->reason, 40);
  fs->n++;
  return 0;
}

/* A submission for p-0100 by their manager p-0005, two lines. */
static size_t submitted(uint8_t *buf) {
  Qm__V1__Actor req = QM__V1__ACTOR__INIT;
  req.person_id = "p-0005";
  char *roles[] = {"employee", "manager"};
  req.n_roles = 2;
  req.roles = roles;
  Qm__V1__RequestLine l1 = QM__V1__REQUEST_LINE__INIT, l2 = QM__V1__REQUEST_LINE__INIT;
  l1.line_no = 1, l1.item_id = "figma", l1.role_id = "viewer", l1.risk = QM__V1__RISK__RISK_STANDARD;
  l2.line_no = 2, l2.item_id = "aws", l2.role_id = "prod-admin", l2.risk = QM__V1__RISK__RISK_ELEVATED;
  l2.cost_minor = 250000;
  Qm__V1__RequestLine *lines[] = {&l1, &l2};
  Qm__V1__RequestSubmitted s = QM__V1__REQUEST_SUBMITTED__INIT;
  s.request_id = "r-1";
  s.requester = &req;
  s.subject_person_id = "p-0100";
  s.subject_department = "Support";
  s.origin = "manager";
  s.n_lines = 2;
  s.lines = lines;
  s.submitted_at_ms = 1795000000000LL;
  Qm__V1__RequestEvent e = QM__V1__REQUEST_EVENT__INIT;
  e.event_case = QM__V1__REQUEST_EVENT__EVENT_SUBMITTED;
  e.submitted = &s;
  return protobuf_c_message_pack(&e.base, buf);
}

Test(payload, decodes_by_topic_with_prefix_and_renders_proto3_json) {
  uint8_t buf[1024];
  size_t len = submitted(buf);
  audit_payload_t p;
  audit_payload_decode("it-x-1.qm.requests.v1", buf, len, &p);
  cr_assert_not_null(p.msg);
  cr_assert_str_eq(p.topic, "qm.requests.v1");
  cr_assert_not(p.dead_letter);
  json_t *j = audit_pb_json(p.msg);
  json_t *s = json_object_get(j, "submitted");
  cr_assert_not_null(s);
  cr_assert_str_eq(json_string_value(json_object_get(s, "subject_person_id")), "p-0100");
  json_t *l2 = json_array_get(json_object_get(s, "lines"), 1);
  cr_assert_str_eq(json_string_value(json_object_get(l2, "risk")), "RISK_ELEVATED");
  cr_assert_eq(json_integer_value(json_object_get(l2, "cost_minor")), 250000);
  cr_assert_eq(json_integer_value(json_object_get(s, "submitted_at_ms")), 1795000000000LL);
  /* proto3: defaults are left out; no other oneof member appears */
  cr_assert_null(json_object_get(json_array_get(json_object_get(s, "lines"), 0), "cost_minor"));
  cr_assert_null(json_object_get(s, "reason"));
  cr_assert_null(json_object_get(j, "cancelled"));
  cr_assert_eq(json_array_size(json_object_get(json_object_get(s, "requester"), "roles")), 2);
  cr_assert_str_eq(audit_payload_actor(&p), "p-0005");
  json_decref(j);
  audit_payload_clear(&p);
}

Test(payload, submission_gives_one_fact_per_line) {
  uint8_t buf[1024];
  size_t len = submitted(buf);
  audit_payload_t p;
  audit_payload_decode("qm.requests.v1", buf, len, &p);
  facts_t fs = {0};
  cr_assert_eq(audit_payload_facts(&p, "r-1", 5, collect, &fs), 0);
  cr_assert_eq(fs.n, 2);
  for (int i = 0; i < 2; i++) {
    cr_assert_str_eq(fs.kinds[i], "submitted");
    cr_assert_str_eq(fs.people[i], "p-0100");
    cr_assert_str_eq(fs.actors[i], "p-0005");
    cr_assert_str_eq(fs.depts[i], "Support");
    cr_assert_str_eq(fs.reasons[i], "manager");
    cr_assert_eq(fs.f[i].at_ms, 1795000000000LL, "the submission's own time, not the record's");
    cr_assert_eq(fs.f[i].line_no, i + 1);
  }
  cr_assert_str_eq(fs.items[0], "figma");
  cr_assert_str_eq(fs.items[1], "aws");
  audit_payload_clear(&p);
}

Test(payload, dead_letters_and_unknown_topics_give_no_facts) {
  uint8_t buf[1024];
  size_t len = submitted(buf);
  audit_payload_t p;
  audit_payload_decode("qm.requests.v1.dlq", buf, len, &p);
  cr_assert(p.dead_letter);
  cr_assert_not_null(p.msg, "a decodable dead letter is still shown");
  facts_t fs = {0};
  audit_payload_facts(&p, "r-1", 5, collect, &fs);
  cr_assert_eq(fs.n, 0, "a dead letter was never applied: no facts");
  audit_payload_clear(&p);
  audit_payload_decode("qm.other.v1", buf, len, &p);
  cr_assert_null(p.msg);
  cr_assert_str_eq(p.topic, "");
  cr_assert_null(audit_pb_json(p.msg));
  audit_payload_clear(&p);
  static const uint8_t junk[] = {0xff, 0xff, 0xff};
  audit_payload_decode("qm.access.v1", junk, sizeof(junk), &p);
  cr_assert_null(p.msg, "undecodable bytes give no message");
  cr_assert_str_eq(audit_payload_actor(&p), "");
  audit_payload_clear(&p);
}

Test(payload, automatic_revocation_and_leaver_facts) {
  Qm__V1__Actor svc = QM__V1__ACTOR__INIT;
  svc.service = "provisioning";
  Qm__V1__AccessRevoked r = QM__V1__ACCESS_REVOKED__INIT;
  r.grant_id = "g-1", r.subject_person_id = "p-0120", r.item_id = "figma", r.reason = "leaver";
  r.revoked_at_ms = 42, r.actor = &svc;
  Qm__V1__AccessEvent ae = QM__V1__ACCESS_EVENT__INIT;
  ae.event_case = QM__V1__ACCESS_EVENT__EVENT_REVOKED;
  ae.revoked = &r;
  uint8_t buf[512];
  size_t len = protobuf_c_message_pack(&ae.base, buf);
  audit_payload_t p;
  audit_payload_decode("qm.access.v1", buf, len, &p);
  facts_t fs = {0};
  audit_payload_facts(&p, "r-9", 99, collect, &fs);
  cr_assert_eq(fs.n, 1);
  cr_assert_str_eq(fs.kinds[0], "revoked");
  cr_assert(fs.f[0].flag, "no person decided it: automatic");
  cr_assert_str_eq(fs.reasons[0], "leaver");
  cr_assert_eq(fs.f[0].at_ms, 42);
  audit_payload_clear(&p);

  /* A leaver effective in the future counts from the effective date. */
  Qm__V1__Person person = QM__V1__PERSON__INIT;
  person.id = "p-0120", person.department = "Sales";
  Qm__V1__HrEvent h = QM__V1__HR_EVENT__INIT;
  h.kind = QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_LEAVER;
  h.effective_date = "2030-01-02";
  h.person = &person;
  len = protobuf_c_message_pack(&h.base, buf);
  audit_payload_decode("qm.hr.lifecycle.v1", buf, len, &p);
  memset(&fs, 0, sizeof(fs));
  audit_payload_facts(&p, "", 1000, collect, &fs);
  cr_assert_eq(fs.n, 1);
  cr_assert_str_eq(fs.kinds[0], "hr_leaver");
  cr_assert_str_eq(fs.depts[0], "Sales");
  cr_assert_eq(fs.f[0].at_ms, 1893542400000LL, "2030-01-02T00:00:00Z");
  audit_payload_clear(&p);
}
