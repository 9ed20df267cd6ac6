"""The queue floor: settings, job records, the artifact store, the intervention registry and the Celery tasks.

Imports `eigenshift_core` and never `app`; the API reaches jobs and artifacts only through the public
functions here (`workers.jobs`, `workers.job_service`, `workers.interventions`, `workers.store`).
"""
