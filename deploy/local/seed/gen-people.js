// Generates people.json: the initial directory of the local stack's 300
// people (p-0001..p-0300), matching the SCIM peer's seeded users. Deterministic:
// run it again and the file is the same. Usage: node gen-people.js > people.json
'use strict';
const depts = ['Engineering', 'Sales', 'Finance', 'Support', 'Security', 'Data'];
const countries = ['NL', 'DE', 'US', 'GB', 'FR'];
const functions = {
  Engineering: 'Software Engineer', Sales: 'Account Executive', Finance: 'Accountant',
  Support: 'Support Specialist', Security: 'Security Engineer', Data: 'Data Analyst',
};
const id = (n) => 'p-' + String(n).padStart(4, '0');
const people = [];
for (let n = 1; n <= 300; n++) {
  const dept = n === 1 ? 'Executive' : depts[(n - 1) % depts.length];
  // p-0001 leads; p-0002..p-0007 head one department each; everyone else
  // reports to their department's head.
  let manager = '';
  if (n >= 2 && n <= 7) manager = id(1);
  else if (n > 7) manager = id(2 + depts.indexOf(dept));
  people.push({
    id: id(n),
    name: 'Person ' + String(n).padStart(4, '0'),
    email: id(n) + '@example.com',
    directory_username: id(n),
    manager_id: manager,
    department: dept,
    job_function: n === 1 ? 'Chief Executive' : (n <= 7 ? 'Head of ' + dept : functions[dept]),
    country: countries[(n - 1) % countries.length],
    location: countries[(n - 1) % countries.length] + '-HQ',
    employment_type: n % 10 === 0 ? 'contractor' : 'employee',
    status: 'active',
    start_date: '2024-01-' + String(1 + (n % 28)).padStart(2, '0'),
  });
}
process.stdout.write(JSON.stringify({people}, null, 1) + '\n');
