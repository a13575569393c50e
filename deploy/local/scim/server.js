// Quartermaster local stack: an in-memory SCIM 2.0 peer (RFC 7643 / RFC 7644).
//
// Built on scimmy (protocol: schemas, filters, PatchOp, list responses) and
// scimmy-routers (express endpoints). scimmy stores nothing: the handlers below
// keep Users and Groups in Maps, so every restart starts from the seed file.
//
// Environment:
//   QM_SCIM_HOST            listen address              (127.0.0.1)
//   QM_SCIM_PORT            listen port                 (8090)
//   QM_SCIM_TOKEN           bearer token to require     (dev-scim-token)
//   QM_SCIM_SEED            JSON seed file              (none)
//   QM_SCIM_STRICT_MEMBERS  1 = group members must be existing User/Group ids,
//                           as real servers demand; 0 = accept any value (1)
//   QM_SCIM_FAULTS          1 = enable POST /_fault (fault injection for tests;
//                           never in a shared stack) (0)
//
// Endpoints: /healthz (no auth) and, under /scim/v2: Users, Groups, Schemas,
// ResourceTypes, ServiceProviderConfig, .search, Bulk.
import crypto from "node:crypto";
import fs from "node:fs";
import express from "express";
import SCIMMY from "scimmy";
import SCIMMYRouters from "scimmy-routers";

const HOST = process.env.QM_SCIM_HOST || "127.0.0.1";
const PORT = Number(process.env.QM_SCIM_PORT || 8090);
const TOKEN = process.env.QM_SCIM_TOKEN || "dev-scim-token";
const SEED = process.env.QM_SCIM_SEED || "";
const STRICT_MEMBERS = (process.env.QM_SCIM_STRICT_MEMBERS ?? "1") !== "0";
const FAULTS = process.env.QM_SCIM_FAULTS === "1";
const BASE = "/scim/v2";

const users = new Map();   // id -> stored User (plain JSON)
const groups = new Map();  // id -> stored Group (plain JSON)

const plain = (v) => JSON.parse(JSON.stringify(v));
const now = () => new Date().toISOString();
const scimError = (status, scimType, message) => new SCIMMY.Types.Error(status, scimType, message);

// Drop what the server owns; scimmy adds schemas/meta.resourceType/location on egress.
function strip(data) {
    const {id, meta, schemas, ...rest} = plain(data);
    return rest;
}

// Match one resource at a time: scimmy's Filter.match throws on a resource that lacks
// the filtered complex attribute (e.g. members[value eq "x"] against an empty group).
// Fast path: a filter made only of `<attr> eq "<value>"` terms (joined by
// "or") on userName or displayName is answered by a plain comparison over the
// store (no deep copy of every resource, no scimmy matcher per resource —
// which cost ~270 ms with a few thousand users); scimmy's matcher still
// confirms each candidate. Anything else takes the full path.
// Case-insensitive, like the attributes.
function indexedCandidates(filter, store) {
    if (!Array.isArray(filter) || !filter.length) return null;
    const wanted = new Set();
    let attr = null;
    for (const expr of filter) {
        const keys = Object.keys(expr ?? {});
        if (keys.length !== 1 || !["userName", "displayName"].includes(keys[0])) return null;
        const [op, value] = expr[keys[0]] ?? [];
        if (op !== "eq" || typeof value !== "string") return null;
        if (attr && attr !== keys[0]) return null;
        attr = keys[0];
        wanted.add(value.toLowerCase());
    }
    const out = [];
    for (const r of store.values())
        if (typeof r[attr] === "string" && wanted.has(r[attr].toLowerCase())) out.push(plain(r));
    return out;
}

function applyFilter(filter, store) {
    if (!filter) return [...store.values()].map(plain);
    const all = indexedCandidates(filter, store) ?? [...store.values()].map(plain);
    return all.filter((r) => {
        try {
            return filter.match([r]).length > 0;
        } catch {
            return false;
        }
    });
}

function stamp(existing) {
    const t = now();
    const version = crypto.randomBytes(6).toString("hex");
    return {created: existing?.meta?.created ?? t, lastModified: t, version: `W/"${version}"`};
}

// ---------------------------------------------------------------- Users
SCIMMY.Resources.declare(SCIMMY.Resources.User)
    .ingress((resource, instance) => {
        const data = strip(instance);
        const existing = resource.id ? users.get(resource.id) : undefined;
        if (resource.id && !existing) throw scimError(404, null, `Resource ${resource.id} not found`);
        const clash = [...users.values()].find((u) =>
            u.id !== resource.id && String(u.userName).toLowerCase() === String(data.userName).toLowerCase());
        if (clash) throw scimError(409, "uniqueness", `userName '${data.userName}' is already in use`);
        const id = resource.id ?? crypto.randomUUID();
        const stored = {...data, id, meta: stamp(existing)};
        users.set(id, stored);
        if (existing && existing.displayName !== stored.displayName) refreshMemberDisplays(id);
        return plain(stored);
    })
    .egress((resource) => {
        if (resource.id) {
            const u = users.get(resource.id);
            if (!u) throw scimError(404, null, `Resource ${resource.id} not found`);
            return plain(u);
        }
        return applyFilter(resource.filter, users);
    })
    .degress((resource) => {
        if (!users.delete(resource.id)) throw scimError(404, null, `Resource ${resource.id} not found`);
        // A deleted user leaves every group, as on a real server.
        for (const g of groups.values()) {
            const before = g.members?.length ?? 0;
            g.members = (g.members ?? []).filter((m) => m.value !== resource.id);
            if (g.members.length !== before) g.meta = stamp(g);
            if (!g.members.length) delete g.members;
        }
    });

// ---------------------------------------------------------------- Groups
function memberRef(value) {
    if (users.has(value)) {
        const u = users.get(value);
        return {value, display: u.displayName ?? u.userName, type: "User", $ref: `${BASE}/Users/${value}`};
    }
    if (groups.has(value)) {
        return {value, display: groups.get(value).displayName, type: "Group", $ref: `${BASE}/Groups/${value}`};
    }
    return undefined;
}

function refreshMemberDisplays(userId) {
    for (const g of groups.values()) {
        for (const m of g.members ?? []) if (m.value === userId) Object.assign(m, memberRef(userId));
    }
}

// Members are a set keyed by value: adding an existing member changes nothing (RFC 7644 §3.5.2.1).
function normaliseMembers(members, selfId) {
    const out = [];
    const seen = new Set();
    for (const m of members ?? []) {
        const value = m?.value;
        if (typeof value !== "string" || !value.length)
            throw scimError(400, "invalidValue", "Group member is missing 'value'");
        if (seen.has(value)) continue;
        seen.add(value);
        if (value === selfId) throw scimError(400, "invalidValue", "A group cannot be a member of itself");
        const ref = memberRef(value);
        if (!ref && STRICT_MEMBERS) throw scimError(400, "invalidValue", `Member '${value}' is not an existing User or Group`);
        out.push(ref ?? {value, ...(m.display ? {display: m.display} : {}), ...(m.type ? {type: m.type} : {})});
    }
    return out;
}

SCIMMY.Resources.declare(SCIMMY.Resources.Group)
    .ingress((resource, instance) => {
        const data = strip(instance);
        const existing = resource.id ? groups.get(resource.id) : undefined;
        if (resource.id && !existing) throw scimError(404, null, `Resource ${resource.id} not found`);
        const clash = [...groups.values()].find((g) =>
            g.id !== resource.id && String(g.displayName).toLowerCase() === String(data.displayName).toLowerCase());
        if (clash) throw scimError(409, "uniqueness", `displayName '${data.displayName}' is already in use`);
        const id = resource.id ?? crypto.randomUUID();
        const members = normaliseMembers(data.members, id);
        const stored = {...data, id};
        if (members.length) stored.members = members; else delete stored.members;
        // Keep meta (and its version) when nothing changed, so a repeated add is a no-op.
        const same = existing && JSON.stringify(strip(existing)) === JSON.stringify(strip(stored));
        stored.meta = same ? existing.meta : stamp(existing);
        groups.set(id, stored);
        return plain(stored);
    })
    .egress((resource) => {
        if (resource.id) {
            const g = groups.get(resource.id);
            if (!g) throw scimError(404, null, `Resource ${resource.id} not found`);
            return plain(g);
        }
        return applyFilter(resource.filter, groups);
    })
    .degress((resource) => {
        if (!groups.delete(resource.id)) throw scimError(404, null, `Resource ${resource.id} not found`);
        for (const g of groups.values()) {
            if (g.members?.some((m) => m.value === resource.id)) {
                g.members = g.members.filter((m) => m.value !== resource.id);
                if (!g.members.length) delete g.members;
                g.meta = stamp(g);
            }
        }
    });

// ---------------------------------------------------------------- seed
async function seed(file) {
    const doc = JSON.parse(fs.readFileSync(file, "utf8"));
    for (const u of doc.users ?? []) await new SCIMMY.Resources.User().write(u);
    for (const g of doc.groups ?? []) await new SCIMMY.Resources.Group().write(g);
    console.log(`[scim] seeded ${users.size} users and ${groups.size} groups from ${file}`);
}

// ---------------------------------------------------------------- HTTP
const app = express();
app.disable("x-powered-by");
app.set("etag", false); // SCIM ETags are not supported (ServiceProviderConfig says so)

app.use((req, res, next) => {
    const start = process.hrtime.bigint();
    res.on("finish", () => {
        const ms = Number(process.hrtime.bigint() - start) / 1e6;
        console.log(`${new Date().toISOString()} ${req.method} ${req.originalUrl} ${res.statusCode} ${ms.toFixed(1)}ms`);
    });
    next();
});

app.get("/healthz", (req, res) => res.status(200).json({status: "ok", users: users.size, groups: groups.size}));

// ---------------------------------------------------------------- faults (tests only)
// POST /_fault {"mode": "status", "status": 500|429|503, "retry_after": <s>, "count": <n>,
//               "methods": ["PATCH"], "path_prefix": "/scim/v2/Groups"}
//   answer the next <n> matching requests (-1: all until cleared) with that status
//   (429/503 with Retry-After when given) without applying them;
// POST /_fault {"mode": "hang", "delay_ms": <ms>, "count": <n>, ...}
//   hold matching requests for delay_ms, then drop the connection, applying nothing;
// POST /_fault {"mode": "down", "down_ms": <ms>}
//   stop listening and cut every open connection, listen again after down_ms;
// POST /_fault {"mode": "none"} clears. GET /_fault shows the fault and counts.
let fault = {mode: "none"};
const faultStats = {injected: 0, requests: 0};
const sockets = new Set();
let server;
if (FAULTS) {
    app.post("/_fault", express.json(), (req, res) => {
        const f = req.body ?? {};
        if (!["none", "status", "hang", "down"].includes(f.mode))
            return res.status(400).json({detail: "mode must be none, status, hang or down"});
        if (f.mode === "down") {
            const ms = Number(f.down_ms ?? 2000);
            res.status(200).json({mode: "down", down_ms: ms});
            res.on("finish", () => setImmediate(() => {
                console.log(`[scim] fault: down for ${ms} ms`);
                server.close();
                for (const s of sockets) s.destroy();
                setTimeout(() => {
                    server = app.listen(PORT, HOST, () => console.log("[scim] fault: listening again"));
                    server.on("connection", trackSocket);
                }, ms);
            }));
            return;
        }
        fault = {count: -1, methods: null, path_prefix: BASE, ...f};
        faultStats.injected = 0;
        console.log(`[scim] fault set: ${JSON.stringify(fault)}`);
        res.status(200).json(fault);
    });
    app.get("/_fault", (req, res) => res.status(200).json({fault, ...faultStats}));
    app.use((req, res, next) => {
        if (fault.mode === "none" || !req.originalUrl.startsWith(fault.path_prefix ?? BASE)) return next();
        if (fault.methods && !fault.methods.includes(req.method)) return next();
        faultStats.requests++;
        if (fault.count === 0) return next();
        if (fault.count > 0) fault.count--;
        faultStats.injected++;
        if (fault.mode === "hang") {
            setTimeout(() => req.socket.destroy(), Number(fault.delay_ms ?? 30000));
            return;
        }
        if (fault.retry_after !== undefined) res.set("Retry-After", String(fault.retry_after));
        res.status(Number(fault.status ?? 500)).type("application/scim+json").send({
            schemas: ["urn:ietf:params:scim:api:messages:2.0:Error"], status: String(fault.status ?? 500),
            detail: "injected fault",
        });
    });
}
function trackSocket(s) {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
}

app.use(BASE, new SCIMMYRouters({
    type: "bearer",
    handler: (req) => {
        const auth = req.header("Authorization") ?? "";
        if (auth !== `Bearer ${TOKEN}`) {
            req.res?.set("WWW-Authenticate", 'Bearer realm="scim"');
            throw new Error(auth ? "Invalid bearer token" : "Missing bearer token");
        }
        return "qm-local";
    },
    context: () => undefined,
}));

// After SCIMMYRouters (which enables patch/filter/sort/bulk by default), state ours explicitly.
SCIMMY.Config.set({patch: true, filter: {supported: true, maxResults: 1000}, sort: true, bulk: true, etag: false, changePassword: false});

app.use((req, res) => res.status(404).type("application/scim+json").send({
    schemas: ["urn:ietf:params:scim:api:messages:2.0:Error"], status: "404", detail: "Endpoint Not Found",
}));

if (SEED) {
    try {
        await seed(SEED);
    } catch (ex) {
        console.error(`[scim] cannot seed from ${SEED}: ${ex.message}`);
        process.exit(1);
    }
}

server = app.listen(PORT, HOST, () => console.log(`[scim] listening on http://${HOST}:${PORT}${BASE} (bearer token required)`));
server.on("connection", trackSocket);
server.on("error", (ex) => {
    console.error(`[scim] ${ex.message}`);
    process.exit(1);
});
for (const sig of ["SIGTERM", "SIGINT"]) process.on(sig, () => {
    for (const s of sockets) s.destroy();
    server.close(() => process.exit(0));
});
